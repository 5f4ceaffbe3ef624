"""Sweep the int8 × int2 matmul kernel's tiles on a GPU; prints the best settings per shape.

The constants in liger_compile/kernels/int2_matmul.py are read at launch time, so each setting is applied by
assigning them; the chosen values are the ones committed there. The launcher runs with `wrap_triton` off, as
inside the op and in Inductor's generated code.

    python benchmarks/tune_int2_matmul.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels import int2_matmul as kernels
from liger_compile.ops import pack_int2

SHAPES = [(4096, 4096), (4096, 14336)]  # (M, K) with N = 14336 and 4096 below
GRID = dict(block_m=(64, 128), block_n=(128, 256), block_k=(64, 128), warps=(8,), stages=(3, 4))


def sweep_shape(m: int, k: int) -> list[dict]:
    torch.manual_seed(0)
    n = 14336 if k == 4096 else 4096
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    packed = pack_int2(torch.randint(-1, 2, (k, n), dtype=torch.int8, device="cuda"))
    out = torch.empty(m, n, dtype=torch.int32, device="cuda")
    results = []
    for block_m, block_n, block_k, warps, stages in itertools.product(*GRID.values()):
        kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K = block_m, block_n, block_k
        kernels.NUM_WARPS, kernels.NUM_STAGES = warps, stages
        try:
            ms = bench(lambda: kernels.int2_matmul(a, packed, out))
        except Exception as error:  # too much shared memory for this tile
            print(f"skipped {block_m}x{block_n}x{block_k} w{warps} s{stages}: {type(error).__name__}")
            continue
        results.append(dict(block_m=block_m, block_n=block_n, block_k=block_k, warps=warps, stages=stages,
                            pass_="forward", rows=m, cols=k, ms=ms))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_int2_matmul", __doc__.splitlines()[0], SHAPES, sweep_shape))
