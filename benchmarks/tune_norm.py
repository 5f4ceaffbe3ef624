"""Sweep the norm kernels' launch parameters on a GPU; prints the best forward and backward settings.

RMSNorm and LayerNorm share the kernels and their constants in liger_compile/kernels/norm.py, which are read
at launch time, so each setting is applied by assigning them; the chosen values are the ones committed
there. Launchers run with `wrap_triton` off, as inside the ops and in Inductor's generated code, so the times
are the kernels' own.

    python benchmarks/tune_norm.py [--norm rms_norm|layer_norm] [--shape ROWSxHIDDEN ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import torch

from _tuning import bench, run_sweep
from liger_compile.kernels import norm as kernels
from liger_compile.kernels._launch import row_tile

SHAPES = [(16384, 4096), (65536, 1024), (4096, 16384), (262144, 128)]
FORWARD_GRID = dict(max_block_n=(8192, 16384), tile=(2048, 4096, 8192), per_thread=(8, 16, 32))
BACKWARD_GRID = dict(FORWARD_GRID, per_sm=(1, 2, 4), stages=(1, 2, 3))


def settings(grid: dict, hidden: int):
    """Every combination of `grid`, less those that launch exactly what an earlier one did."""
    seen = set()
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        tile = row_tile(hidden, max_block_n=setting["max_block_n"], tile_elements=setting["tile"],
                        elements_per_thread=setting["per_thread"])
        key = (tile, setting.get("per_sm"), setting.get("stages"))
        if key not in seen:
            seen.add(key)
            yield setting


def _launchers(norm: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """(forward, backward) calls of `norm`'s launchers on these tensors."""
    if norm == "rms_norm":
        _, rstd = kernels.rms_norm_forward(x, w, 1e-6, 0.0, "llama", torch.bfloat16)
        return (lambda: kernels.rms_norm_forward(x, w, 1e-6, 0.0, "llama", torch.bfloat16),
                lambda: kernels.rms_norm_backward(dy, x, w, rstd, 0.0, "llama", True))
    _, mean, rstd = kernels.layer_norm_forward(x, w, w, 1e-5)
    return (lambda: kernels.layer_norm_forward(x, w, w, 1e-5),
            lambda: kernels.layer_norm_backward(dy, x, w, mean, rstd, True, True))


def sweep_shape(norm: str, rows: int, hidden: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    forward, backward = _launchers(norm, x, w, dy)
    results = []
    for s in settings(FORWARD_GRID, hidden):
        kernels.MAX_BLOCK_N, kernels.FORWARD_TILE_ELEMENTS, kernels.FORWARD_ELEMENTS_PER_THREAD = (
            s["max_block_n"], s["tile"], s["per_thread"])
        results.append(dict(s, pass_="forward", rows=rows, hidden=hidden, ms=bench(forward)))
    for s in settings(BACKWARD_GRID, hidden):
        kernels.MAX_BLOCK_N, kernels.BACKWARD_TILE_ELEMENTS, kernels.BACKWARD_ELEMENTS_PER_THREAD = (
            s["max_block_n"], s["tile"], s["per_thread"])
        kernels.BACKWARD_PROGRAMS_PER_SM, kernels.BACKWARD_STAGES = s["per_sm"], s["stages"]
        results.append(dict(s, pass_="backward", rows=rows, hidden=hidden, ms=bench(backward)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--norm", choices=("rms_norm", "layer_norm"), default="rms_norm")
    parser.add_argument("--shape", action="append", help="ROWSxHIDDEN (default: %s)" % " ".join(
        f"{r}x{h}" for r, h in SHAPES))
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shape] if args.shape else SHAPES
    return run_sweep(f"tune_{args.norm}", shapes, functools.partial(sweep_shape, args.norm), args.out)


if __name__ == "__main__":
    sys.exit(main())
