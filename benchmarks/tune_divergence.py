"""Sweep the divergence kernels' launch parameters on a GPU; prints the best settings per pass.

Forward: the JSD's loss and student gradient in one pass (the mixture, the heaviest form), and the KL's loss;
backward: the KL's input gradient; at the JSD bar's shape. The constants in liger_compile/kernels/divergence.py
are read at launch time, so each setting is applied by assigning them.

    python benchmarks/tune_divergence.py [--out DIR]
"""

from __future__ import annotations

import itertools
import sys

import torch

from _tuning import bench, sweep_main
from liger_compile.kernels import divergence as kernels

SHAPES = [(4096, 128256)]
GRID = dict(block=(2048, 4096, 8192), warps=(4, 8, 16), stages=(1, 2, 3, 4))


def sweep_shape(rows: int, cols: int) -> list[dict]:
    torch.manual_seed(0)
    x, y = (torch.randn(rows, cols, device="cuda").log_softmax(-1).bfloat16() for _ in range(2))
    loss, scale, dx = torch.empty(rows, device="cuda"), torch.ones(rows, device="cuda"), torch.empty_like(x)
    results = []
    for block, warps, stages in itertools.product(*GRID.values()):
        kernels.BLOCK_V, kernels.NUM_WARPS, kernels.NUM_STAGES = block, warps, stages
        kernels.MIXTURE_BLOCK_V, kernels.MIXTURE_NUM_WARPS, kernels.MIXTURE_NUM_STAGES = block, warps, stages
        runs = [("mixture", "forward", dict(beta=0.5, row_loss=loss, scale=scale, dx=dx)),
                ("kl_log_target", "forward", dict(row_loss=loss)),
                ("kl_log_target", "backward", dict(scale=scale, dx=dx))]
        for form, pass_, options in runs:
            ms = bench(lambda: kernels.divergence_rows(x, y, form=form, **options))
            results.append(dict(form=form, block=block, warps=warps, stages=stages, pass_=pass_, rows=rows,
                                cols=cols, ms=ms))
    return results


if __name__ == "__main__":
    sys.exit(sweep_main("tune_divergence", __doc__.splitlines()[0], SHAPES, sweep_shape))
