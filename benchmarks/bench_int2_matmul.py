"""GPU benchmark of the experimental int8 × int2 (ternary) matmul against the int8 matmuls PyTorch has.

For x (M, K) int8 and ternary weights (K, N), packed 2 bits each (`liger_compile.ops.pack_int2`), times
(`triton.testing.do_bench` median, ms) and TOPS (2 M N K operations) of

- ``liger op``: ``torch.ops.liger.matmul_int2_int8(x, packed)``, unpacking tiles in registers;
- ``_int_mm (unpacked once)``: ``torch._int_mm(x, w)`` on int8 weights unpacked outside the timing: the int8 peer,
  which reads 4x the weight bytes;
- ``unpack + _int_mm``: the unpacking (`unpack_int2`) inside the timed call, as code that stores packed weights
  runs eagerly;
- ``compiled unpack + _int_mm``: that function under ``torch.compile`` (Inductor);
- ``liger backend``: the same function under ``torch.compile(backend="liger")``, whose int2_matmul rewrite turns
  it into the liger op;
- ``liger-kernel``: liger-kernel's experimental int8 x int2 matmul (same packing), when importable;

each result checked bit for bit against the int8 peer's.

    python benchmarks/bench_int2_matmul.py [--shape M,K,N ...] [--out benchmarks/results]

Without arguments: M = 4096 and (K, N) of 4096 x 4096, 4096 x 14336 and 14336 x 4096 (Llama-3-8B's projections).
Prints a markdown table and writes bench_int2_matmul.json; without CUDA it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

from liger_compile.ops import matmul_int2_int8, pack_int2, unpack_int2

DEFAULT_SHAPES = [(4096, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096)]


def unpack_then_int_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(x, unpack_int2(packed))


def bench_int2(M: int, K: int, N: int) -> dict[str, dict[str, float]]:
    """{implementation: {"ms": median time, "tops": 2 M N K / time}} for x (M, K) int8 @ ternary (K, N) on the
    current CUDA device; raises AssertionError if any result differs from ``torch._int_mm``'s on unpacked weights."""
    import triton

    torch.manual_seed(0)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
    packed = pack_int2(torch.randint(-1, 2, (K, N), dtype=torch.int8, device="cuda"))
    w = unpack_int2(packed)
    torch._dynamo.reset()
    implementations = {
        "liger op": functools.partial(matmul_int2_int8, x, packed),
        "_int_mm (unpacked once)": functools.partial(torch._int_mm, x, w),
        "unpack + _int_mm": functools.partial(unpack_then_int_mm, x, packed),
        "compiled unpack + _int_mm": functools.partial(torch.compile(unpack_then_int_mm), x, packed),
        "liger backend": functools.partial(
            torch.compile(unpack_then_int_mm, backend="liger"), x, packed),
    }
    try:
        from liger_kernel.ops.experimental.mm_int8int2 import matmul as liger_kernel_matmul
    except ImportError:  # the peer is optional
        pass
    else:
        implementations["liger-kernel"] = functools.partial(liger_kernel_matmul, x, packed)
    expected = torch._int_mm(x, w)
    results = {}
    for name, fn in implementations.items():
        if not torch.equal(fn(), expected):
            raise AssertionError(f"{name} differs from torch._int_mm on the unpacked weights ({M}x{K}x{N})")
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        results[name] = {"ms": ms, "tops": 2 * M * N * K / ms / 1e9}
    return results


def _shape(text: str) -> tuple[int, int, int]:
    m, k, n = (int(v) for v in text.split(","))
    return m, k, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_shape, action="append", help="M,K,N (repeatable)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_int2_matmul: needs CUDA (no GPU here); nothing measured.")
        return 0
    rows = []
    print("| M | K | N | implementation | ms | TOPS |\n|---|---|---|---|---|---|")
    for m, k, n in args.shape or DEFAULT_SHAPES:
        for name, result in bench_int2(m, k, n).items():
            rows.append({"M": m, "K": k, "N": n, "impl": name, **result})
            print(f"| {m} | {k} | {n} | {name} | {result['ms']:.4f} | {result['tops']:.1f} |", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_int2_matmul.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
