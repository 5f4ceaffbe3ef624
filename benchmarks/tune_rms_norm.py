"""Sweep the RMSNorm kernels' launch parameters on a GPU; prints forward and backward times per setting.

The constants in liger_compile/kernels/rms_norm.py are read at launch time, so each setting is applied by
assigning them. The chosen values are the ones committed there.

    python benchmarks/tune_rms_norm.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_rms_norm: no CUDA device")
        return 0
    from liger_compile.kernels import rms_norm as kernels
    from liger_compile.kernels._launch import row_tile

    results = []
    shapes = [(16384, 4096), (65536, 1024), (4096, 16384), (262144, 128)]
    for rows, hidden in shapes:
        torch.manual_seed(0)
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        _, rstd = kernels.rms_norm_forward(x, w, 1e-6, 0.0, "llama", torch.bfloat16)
        seen = set()

        def new_setting(max_block_n, tile, per_thread, *rest):
            """Skip settings that launch exactly what an earlier one did."""
            key = (row_tile(rows, hidden, max_block_n=max_block_n, tile_elements=tile,
                            elements_per_thread=per_thread), *rest)
            if key in seen:
                return False
            seen.add(key)
            return True

        for max_block_n, tile, per_thread in itertools.product((8192, 16384), (2048, 4096, 8192), (8, 16, 32)):
            if not new_setting(max_block_n, tile, per_thread, "forward"):
                continue
            kernels.MAX_BLOCK_N, kernels.FORWARD_TILE_ELEMENTS, kernels.FORWARD_ELEMENTS_PER_THREAD = (
                max_block_n, tile, per_thread)
            ms = bench(lambda: kernels.rms_norm_forward(x, w, 1e-6, 0.0, "llama", torch.bfloat16))
            results.append(dict(pass_="forward", rows=rows, hidden=hidden, max_block_n=max_block_n, tile=tile,
                                per_thread=per_thread, ms=ms))
        for max_block_n, tile, per_thread, per_sm, stages in itertools.product(
                (8192, 16384), (2048, 4096, 8192), (8, 16, 32), (1, 2, 4), (1, 2, 3)):
            if not new_setting(max_block_n, tile, per_thread, per_sm, stages):
                continue
            kernels.MAX_BLOCK_N, kernels.BACKWARD_TILE_ELEMENTS, kernels.BACKWARD_ELEMENTS_PER_THREAD = (
                max_block_n, tile, per_thread)
            kernels.BACKWARD_PROGRAMS_PER_SM, kernels.BACKWARD_STAGES = per_sm, stages
            ms = bench(lambda: kernels.rms_norm_backward(dy, x, w, rstd, 0.0, "llama", True))
            results.append(dict(pass_="backward", rows=rows, hidden=hidden, max_block_n=max_block_n, tile=tile,
                                per_thread=per_thread, per_sm=per_sm, stages=stages, ms=ms))
        for pass_ in ("forward", "backward"):
            best = sorted((r for r in results if r["pass_"] == pass_ and r["hidden"] == hidden),
                          key=lambda r: r["ms"])[:5]
            print(f"{rows}x{hidden} {pass_} best: " + "; ".join(
                f"{r['ms']:.4f} ms {dict((k, v) for k, v in r.items() if k not in ('pass_', 'rows', 'hidden', 'ms'))}"
                for r in best), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_rms_norm.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
