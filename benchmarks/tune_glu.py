"""Sweep the gated-activation kernels' launch parameters on a GPU; prints the best settings per pass.

The constants in liger_compile/kernels/glu.py are read at launch time, so each setting is applied by
assigning them; the chosen values are the ones committed there. Launchers run with `wrap_triton` off, as
inside the ops and in Inductor's generated code.

    python benchmarks/tune_glu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
from torch._library.triton import set_wrap_triton_enabled

from liger_compile.kernels import glu as kernels

SHAPES = [(16384, 14336), (16384, 4096)]
GRID = dict(tile=(1024, 2048, 4096, 8192), per_thread=(4, 8, 16))


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_glu: no CUDA device; the sweep only measures GPUs.")
        return 0
    results = []
    with set_wrap_triton_enabled(False):
        for rows, cols in SHAPES:
            shape_results = sweep_shape(rows, cols)
            results += shape_results
            for pass_ in ("forward", "backward"):
                best = sorted((r for r in shape_results if r["pass_"] == pass_), key=lambda r: r["ms"])[:4]
                print(f"{rows}x{cols} {pass_}: " + "; ".join(
                    f"{r['ms']:.4f} ms tile={r['tile']} per_thread={r['per_thread']}" for r in best), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_glu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
