"""Sweep the RoPE kernel's launch parameters on a GPU; prints the best settings per pass.

The constants in liger_compile/kernels/rope.py are read at launch time, so each setting is applied by
assigning them; the chosen values are the ones committed there. Launchers run with `wrap_triton` off, as
inside the ops and in Inductor's generated code.

    python benchmarks/tune_rope.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels import rope as kernels

# (batch, seq) with Llama-3-8B's attention: 32 q heads, 8 k heads, head_dim 128, (B, H, T, D) views of
# (B, T, H, D) projections as HF makes them
SHAPES = [(4, 4096), (1, 4096), (8, 1024)]
HEADS_Q, HEADS_K, HEAD_DIM = 32, 8, 128
GRID = dict(tile=(512, 1024, 2048, 4096), num_warps=(1, 2, 4, 8))


def sweep_shape(batch: int, seq: int) -> list[dict]:
    torch.manual_seed(0)

    def heads(n):
        return torch.randn(batch, seq, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k = heads(HEADS_Q), heads(HEADS_K)
    cos, sin = (torch.randn(batch, 1, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    results = []
    for tile, num_warps in itertools.product(*GRID.values()):
        kernels.TILE_ELEMENTS, kernels.NUM_WARPS = tile, num_warps
        for pass_, backward in [("forward", False), ("backward", True)]:
            ms = bench(lambda: kernels.rope(q, k, cos, sin, q_out, k_out, backward=backward))
            results.append(dict(tile=tile, num_warps=num_warps, pass_=pass_, rows=batch, cols=seq, ms=ms))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_rope", __doc__.splitlines()[0], SHAPES, sweep_shape))
