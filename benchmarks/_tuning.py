"""What the launch-parameter sweeps (tune_*.py) share: timing, the per-shape summary, the JSON they save."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch

_NOT_SETTINGS = ("pass_", "rows", "cols", "hidden", "ms")


def bench(fn: Callable[[], object]) -> float:
    """`fn`'s GPU time in ms, replayed from a CUDA graph: the launches of small kernels would otherwise time the
    host's launch overhead, not the kernels."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def run_sweep(name: str, shapes: list[tuple[int, int]], sweep_shape: Callable[[int, int], list[dict]],
              out: str) -> int:
    """Sweep every shape (each result a dict of its settings, `pass_` and `ms`), print the four fastest
    settings per pass and shape, and save all results to `out`/`name`.json.

    The launchers run with `wrap_triton` off, as inside the ops and in Inductor's generated code, so the
    times are the kernels' own.
    """
    from torch._library.triton import set_wrap_triton_enabled

    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device; the sweep only measures GPUs.")
        return 0
    results = []
    with set_wrap_triton_enabled(False):
        for rows, cols in shapes:
            shape_results = sweep_shape(rows, cols)
            results += shape_results
            for pass_ in ("forward", "backward"):
                best = sorted((r for r in shape_results if r["pass_"] == pass_), key=lambda r: r["ms"])[:4]
                print(f"{rows}x{cols} {pass_}: " + "; ".join(
                    f"{r['ms']:.4f} ms {({k: v for k, v in r.items() if k not in _NOT_SETTINGS})}"
                    for r in best), flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=0)
    return 0


def sweep_main(name: str, description: str, shapes: list[tuple[int, int]],
               sweep_shape: Callable[[int, int], list[dict]], argv: list[str] | None = None) -> int:
    """The command line of a sweep whose only option is ``--out`` (default: benchmarks/results)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return run_sweep(name, shapes, sweep_shape, parser.parse_args(argv).out)
