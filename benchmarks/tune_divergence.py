"""Sweep the divergence kernels' launch parameters on a GPU; prints the best settings per pass.

Forward is the JSD's row losses (the mixture, the heaviest form) and the KL's; backward the JSD's student
gradient and the KL's input gradient, at the JSD bar's shape. The constants in
liger_compile/kernels/divergence.py are read at launch time, so each setting is applied by assigning them.

    python benchmarks/tune_divergence.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from _tuning import bench, run_sweep
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
        for form, beta in (("mixture", 0.5), ("kl_log_target", 0.0)):
            for pass_, fn in [("forward", lambda: kernels.divergence_rows(x, y, form=form, beta=beta, row_loss=loss)),
                              ("backward", lambda: kernels.divergence_rows(x, y, form=form, beta=beta, scale=scale,
                                                                          dx=dx))]:
                results.append(dict(form=form, block=block, warps=warps, stages=stages, pass_=pass_, rows=rows,
                                    cols=cols, ms=bench(fn)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    return run_sweep("tune_divergence", SHAPES, sweep_shape, args.out)


if __name__ == "__main__":
    sys.exit(main())
