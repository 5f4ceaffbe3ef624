"""Sweep the embedding kernels' launch parameters on a GPU; prints the best settings per pass.

The constants in liger_compile/kernels/embedding.py are read at launch time, so each setting is applied by
assigning them; the chosen values are the ones committed there. Launchers run with `wrap_triton` off, as
inside the ops and in Inductor's generated code. Ids are uniform over Llama-3's vocabulary.

    python benchmarks/tune_embedding.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels import embedding as kernels

VOCAB = 128256
SHAPES = [(16384, 4096), (16384, 2048)]  # (ids, hidden)
GRID = dict(block_m=(4, 8, 16, 32), block_n=(1024, 2048, 4096), warps=(4, 8))


def sweep_shape(n_ids: int, hidden: int) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (n_ids,), device="cuda")
    out, dy = torch.empty(n_ids, hidden, device="cuda", dtype=torch.bfloat16), torch.randn_like(weight[:n_ids])
    dw = torch.zeros_like(weight)
    results = []
    for block_m, block_n, warps in itertools.product(*GRID.values()):
        kernels.FORWARD_BLOCK_M, kernels.FORWARD_BLOCK_N, kernels.FORWARD_WARPS = block_m, block_n, warps
        kernels.BACKWARD_BLOCK_M, kernels.BACKWARD_BLOCK_N, kernels.BACKWARD_WARPS = block_m, block_n, warps
        for pass_, fn in [("forward", lambda: kernels.embedding_forward(ids, weight, out)),
                          ("backward", lambda: kernels.embedding_backward(dy, ids, dw, -1))]:
            results.append(dict(block_m=block_m, block_n=block_n, warps=warps, pass_=pass_, rows=n_ids, cols=hidden,
                                ms=bench(fn)))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_embedding", __doc__.splitlines()[0], SHAPES, sweep_shape))
