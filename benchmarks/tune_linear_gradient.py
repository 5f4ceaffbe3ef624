"""Sweep the weight-gradient accumulation kernel's tiles on a GPU against cuBLAS's addmm_; prints the best per chunk.

``grad_weight += dlogits.T @ hidden_chunk`` at the Llama-3-8B lm_head shape (vocab 128256, hidden 4096, bf16) for
row chunks of 128 to 2048 rows, what a fused linear loss adds per chunk. `cublas` rows are ``addmm_``; the others
the Triton kernel (liger_compile/kernels/linear_gradient.py) with the tiles shown, whose committed TILES and the
ops' SHORT_CHUNK_ROWS come from this sweep.

    python benchmarks/tune_linear_gradient.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels.linear_gradient import Tiles, accumulate_transposed_product_

VOCAB, HIDDEN = 128256, 4096
SHAPES = [(rows, VOCAB) for rows in (128, 256, 512, 1024, 2048)]
GRID = [Tiles(*t) for t in itertools.product((128,), (128, 256), (64,), (8,), (3, 4), (True, False))] + [
    Tiles(128, 128, 64, 4, 4), Tiles(64, 256, 64, 4, 4), Tiles(256, 128, 64, 8, 3), Tiles(128, 128, 32, 4, 5),
    Tiles(64, 128, 64, 4, 4)]


def sweep_shape(rows: int, vocab: int) -> list[dict]:
    torch.manual_seed(0)
    dlogits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    grad_weight = torch.randn(vocab, HIDDEN, device="cuda", dtype=torch.bfloat16)
    expected = grad_weight.clone().addmm_(dlogits.t(), hidden)
    results = [dict(tiles="cublas", pass_="accumulate", rows=rows, cols=vocab,
                    ms=bench(lambda: grad_weight.addmm_(dlogits.t(), hidden)))]
    for tiles in GRID:
        out = grad_weight.clone()
        try:
            accumulate_transposed_product_(out, dlogits, hidden, tiles)
            ms = bench(lambda: accumulate_transposed_product_(grad_weight, dlogits, hidden, tiles))
        except Exception as error:  # too much shared memory for this tile
            print(f"skipped {tiles}: {type(error).__name__}")
            continue
        # against addmm_: both round the fp32 sum once, so they differ by summation order alone
        difference = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        results.append(dict(tiles="x".join(map(str, tiles)), pass_="accumulate", rows=rows, cols=vocab,
                            max_difference=difference, ms=ms))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_linear_gradient", __doc__.splitlines()[0], SHAPES, sweep_shape))
