"""Fused linear + cross-entropy on the GPU: time and memory against the matmul floor and the peers, one run.

For hidden (N, H) bf16, an lm_head weight (V, H) and labels with 1 in 7 ignored, forward+backward of
``cross_entropy(hidden @ weight.T, labels)`` by: the floor (the three bf16 GEMMs the unfused computation needs,
alone), eager (HF's upcast then F.cross_entropy), Inductor, liger-kernel's FLCE, ``F.linear_cross_entropy`` where
the installed torch has it, and liger-compile at several chunk sizes (the memory/speed knob) and automatic.
Time: ``triton.testing.do_bench`` median of whole steps; memory: peak allocated during one step above the
inputs and the hidden and weight gradients every implementation must return.

    python benchmarks/bench_flce.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from bench_ops import relative_error

try:
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
except ImportError:  # the peer is optional
    LigerFusedLinearCrossEntropyFunction = None

CHUNKS = (256, 512, 1024, 2048, 4096)


def eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=-100)


def implementations(quick: bool) -> dict:
    found = {"eager": eager, "inductor": torch.compile(eager, dynamic=False)}
    if LigerFusedLinearCrossEntropyFunction is not None:
        def liger_kernel(hidden, weight, target):
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, target)
            return out[0] if isinstance(out, tuple) else out
        found["liger-kernel"] = liger_kernel
    if hasattr(F, "linear_cross_entropy"):
        found["F.linear_cross_entropy"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100)
    for chunk in (() if quick else CHUNKS) + (0,):
        found[f"liger-compile chunk {chunk or 'auto'}"] = (
            lambda h, w, t, chunk=chunk: torch.ops.liger.fused_linear_cross_entropy(h, w, None, t, chunk_rows=chunk))
    found["liger-compile backend"] = torch.compile(eager, backend="liger", dynamic=False)
    return found


def inputs(rows: int, hidden_size: int, vocab: int):
    torch.manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size**0.5).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    return hidden, weight, target


def floor_ms(rows: int, hidden_size: int, vocab: int) -> float:
    """The three GEMMs of the unfused computation alone (logits, then the hidden and weight gradients)."""
    import triton

    hidden, weight, _ = inputs(rows, hidden_size, vocab)

    def gemms():
        logits = hidden @ weight.t()
        return logits @ weight, logits.t() @ hidden

    with torch.no_grad():
        return triton.testing.do_bench(gemms, warmup=3, rep=400, return_mode="median")


def measure(fn, rows, hidden_size, vocab, reference=None) -> dict:
    import triton

    hidden, weight, target = inputs(rows, hidden_size, vocab)

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, target).backward()

    step()
    grads = (hidden.grad.clone(), weight.grad.clone())
    loss = fn(hidden, weight, target).detach()
    error = None
    if reference is not None:
        error = max(relative_error(a, b) for a, b in zip((loss, *grads), reference))
    ms = triton.testing.do_bench(step, warmup=3, rep=400, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()  # inputs and the gradients of the previous step, kept by .grad
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": ms, "extra_mib": extra, "rel_error": error}, (loss, *grads)


def run(quick: bool) -> list[dict]:
    shapes = [(8192, 4096, 128256)] if quick else [(8192, 4096, 128256), (4096, 4096, 262144),
                                                    (8192, 4096, 32000), (16384, 4096, 128256)]
    rows_out = []
    for rows, hidden_size, vocab in shapes:
        torch._dynamo.reset()
        shape = f"N={rows} H={hidden_size} V={vocab}"
        floor = floor_ms(rows, hidden_size, vocab)
        rows_out.append({"shape": shape, "impl": "floor (3 GEMMs)", "ms": floor, "extra_mib": None,
                         "rel_error": None, "x_floor": 1.0})
        print(f"{shape:<30}{'floor (3 GEMMs)':<30}{floor:>9.2f}", flush=True)
        reference = None
        for name, fn in implementations(quick).items():
            try:
                result, outputs = measure(fn, rows, hidden_size, vocab, reference)
            except torch.OutOfMemoryError:
                print(f"{shape:<30}{name:<30} out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            reference = reference or outputs
            result.update(shape=shape, impl=name, x_floor=result["ms"] / floor)
            rows_out.append(result)
            error = "" if result["rel_error"] is None else f"{result['rel_error']:.1e}"
            print(f"{shape:<30}{name:<30}{result['ms']:>9.2f}{result['x_floor']:>7.2f}x"
                  f"{result['extra_mib']:>9.0f} MiB {error}", flush=True)
            torch.cuda.empty_cache()
    return rows_out


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Measured on {device}, torch {torch.__version__}, bf16, 1 label in 7 ignored. ms: forward+backward "
             "(`do_bench` median); × floor: over the three GEMMs alone; MiB: peak above the inputs and the "
             "hidden and weight gradients; error: max relative (L2) error of loss and gradients vs eager.", "",
             "| shape | implementation | ms | × floor | extra MiB | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = "" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
        error = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['ms']:.2f} | {r['x_floor']:.2f} | {extra} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only N=8192, V=128256, automatic chunks")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_flce: no CUDA device; this benchmark only measures GPUs.")
        return 0
    import liger_compile  # noqa: F401  (registers the ops and the backend)

    rows = run(args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_flce.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "bench_flce.md"), "w") as f:
        f.write(markdown(rows, torch.cuda.get_device_name()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
