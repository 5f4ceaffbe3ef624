"""Sweep the gated-activation kernels' launch parameters on a GPU; prints the best settings per pass.

The constants in liger_compile/kernels/glu.py are read at launch time, so each setting is applied by
assigning them; the chosen values are the ones committed there. Launchers run with `wrap_triton` off, as
inside the ops and in Inductor's generated code.

    python benchmarks/tune_glu.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels import glu as kernels

SHAPES = [(16384, 14336), (16384, 4096)]
GRID = dict(tile=(1024, 2048, 4096, 8192), per_thread=(4, 8, 16))


def sweep_shape(rows: int, cols: int) -> list[dict]:
    torch.manual_seed(0)
    a, b, dy = (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    y, da, db = (torch.empty_like(a) for _ in range(3))
    results = []
    for tile, per_thread in itertools.product(*GRID.values()):
        kernels.TILE_ELEMENTS, kernels.ELEMENTS_PER_THREAD = tile, per_thread
        for pass_, fn in [("forward", lambda: kernels.glu_forward(a, b, y, "silu")),
                          ("backward", lambda: kernels.glu_backward(dy, a, b, da, db, "silu"))]:
            results.append(dict(tile=tile, per_thread=per_thread, pass_=pass_, rows=rows, cols=cols, ms=bench(fn)))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_glu", __doc__.splitlines()[0], SHAPES, sweep_shape))
