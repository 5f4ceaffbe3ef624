"""Fused linear losses on the GPU: time and memory against the matmul floor and the peers, one run.

``--loss cross_entropy`` (default): for hidden (N, H) bf16, an lm_head weight (V, H) and labels with 1 in 7
ignored, forward+backward of ``cross_entropy(hidden @ weight.T, labels)`` by: the floor (the three bf16 GEMMs the
unfused computation needs, alone), eager (HF's upcast then F.cross_entropy), Inductor, liger-kernel's FLCE,
``F.linear_cross_entropy`` where the installed torch has it, and liger-compile at several chunk sizes (the
memory/speed knob) and automatic.

``--loss jsd``: distillation, a student (hidden N x H, lm_head V x H) against a teacher of the same shapes: the JSD
(beta 0.5, temperature 2) of their softmaxes, as TRL's GKD trainer writes it, after an upcast. The floor is four
GEMMs (both sides' logits, the student's two gradients); the peers are eager, Inductor and liger-kernel's
fused linear JSD.

Time: ``triton.testing.do_bench`` median of whole steps; memory: peak allocated during one step above the
inputs and the (student's) hidden and weight gradients every implementation must return.

    python benchmarks/bench_flce.py [--loss jsd] [--quick] [--chunks 256,512] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from bench_ops import relative_error

try:
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction, LigerFusedLinearJSDFunction
except ImportError:  # the peer is optional
    LigerFusedLinearCrossEntropyFunction = LigerFusedLinearJSDFunction = None

CHUNKS = (256, 512, 1024, 2048, 4096)
BETA, TEMPERATURE = 0.5, 2.0


def eager(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=-100)


def eager_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, target):
    """TRL's generalized_jsd_loss on the upcast logits (labels unused, as there with labels=None)."""
    student = F.log_softmax(F.linear(student_hidden, student_weight).float() / TEMPERATURE, dim=-1)
    teacher = F.log_softmax(F.linear(teacher_hidden, teacher_weight).float() / TEMPERATURE, dim=-1)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - BETA), teacher + math.log(BETA)]), dim=0)
    jsd = (BETA * F.kl_div(mixture, teacher, reduction="none", log_target=True)
           + (1 - BETA) * F.kl_div(mixture, student, reduction="none", log_target=True))
    return jsd.sum() / student.shape[0]


def jsd_implementations(chunks: tuple[int, ...]) -> dict:
    found = {"eager": eager_jsd, "inductor": torch.compile(eager_jsd, dynamic=False)}
    if LigerFusedLinearJSDFunction is not None:
        found["liger-kernel"] = lambda hs, ws, ht, wt, t: LigerFusedLinearJSDFunction.apply(
            hs, ws, ht, wt, None, BETA, -100, TEMPERATURE)
    for chunk in chunks + (0,):
        found[f"liger-compile chunk {chunk or 'auto'}"] = (
            lambda hs, ws, ht, wt, t, chunk=chunk: torch.ops.liger.fused_linear_jsd(
                hs, ws, ht, wt, None, BETA, -100, TEMPERATURE, "batchmean", chunk))
    found["liger-compile backend"] = torch.compile(eager_jsd, backend="liger", dynamic=False)
    return found


def implementations(chunks: tuple[int, ...]) -> dict:
    found = {"eager": eager, "inductor": torch.compile(eager, dynamic=False)}
    if LigerFusedLinearCrossEntropyFunction is not None:
        def liger_kernel(hidden, weight, target):
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, target)
            return out[0] if isinstance(out, tuple) else out
        found["liger-kernel"] = liger_kernel
    if hasattr(F, "linear_cross_entropy"):
        found["F.linear_cross_entropy"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100)
    for chunk in chunks + (0,):
        found[f"liger-compile chunk {chunk or 'auto'}"] = (
            lambda h, w, t, chunk=chunk: torch.ops.liger.fused_linear_cross_entropy(h, w, None, t, chunk_rows=chunk))
    found["liger-compile backend"] = torch.compile(eager, backend="liger", dynamic=False)
    return found


def inputs(rows: int, hidden_size: int, vocab: int, teacher: bool = False):
    """(hidden, weight[, teacher hidden, teacher weight], labels); the first two need gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size**0.5).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    if not teacher:
        return hidden, weight, target
    teacher_hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    teacher_weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size**0.5).bfloat16()
    return hidden, weight, teacher_hidden, teacher_weight, target


def floor_ms(rows: int, hidden_size: int, vocab: int, teacher: bool = False) -> float:
    """The GEMMs of the unfused computation alone: the logits (and the teacher's), then the hidden and weight
    gradients."""
    import triton

    hidden, weight, *_ = inputs(rows, hidden_size, vocab)

    def gemms():
        logits = hidden @ weight.t()
        teacher_logits = hidden @ weight.t() if teacher else None
        return logits @ weight, logits.t() @ hidden, teacher_logits

    with torch.no_grad():
        return triton.testing.do_bench(gemms, warmup=3, rep=400, return_mode="median")


def measure(fn, rows, hidden_size, vocab, reference=None, teacher=False) -> dict:
    import triton

    tensors = inputs(rows, hidden_size, vocab, teacher)
    hidden, weight = tensors[:2]

    def step():
        hidden.grad = weight.grad = None
        fn(*tensors).backward()

    step()
    grads = (hidden.grad.clone(), weight.grad.clone())
    loss = fn(*tensors).detach()
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


def run(quick: bool, loss: str = "cross_entropy", chunks: tuple[int, ...] | None = None) -> list[dict]:
    """`chunks`: the chunk sizes measured besides the automatic one (default: none with `quick`, else CHUNKS)."""
    chunks = (() if quick else CHUNKS) if chunks is None else chunks
    shapes = [(8192, 4096, 128256)] if quick else [(8192, 4096, 128256), (4096, 4096, 262144),
                                                    (8192, 4096, 32000), (16384, 4096, 128256)]
    teacher = loss == "jsd"
    floor_name = "floor (4 GEMMs)" if teacher else "floor (3 GEMMs)"
    rows_out = []
    for rows, hidden_size, vocab in shapes:
        torch._dynamo.reset()
        shape = f"N={rows} H={hidden_size} V={vocab}"
        floor = floor_ms(rows, hidden_size, vocab, teacher)
        rows_out.append({"shape": shape, "impl": floor_name, "ms": floor, "extra_mib": None,
                         "rel_error": None, "x_floor": 1.0})
        print(f"{shape:<30}{floor_name:<30}{floor:>9.2f}", flush=True)
        reference = None
        for name, fn in (jsd_implementations if teacher else implementations)(chunks).items():
            try:
                result, outputs = measure(fn, rows, hidden_size, vocab, reference, teacher)
            except Exception as error:  # out of memory, or a peer that fails: a finding, not the end of the run
                print(f"{shape:<30}{name:<30} {type(error).__name__}: {str(error)[:200]}", flush=True)
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
             "(`do_bench` median); × floor: over the GEMMs alone (the floor row); MiB: peak above the inputs "
             "and the hidden and weight gradients; error: max relative (L2) error of loss and gradients vs eager.", "",
             "| shape | implementation | ms | × floor | extra MiB | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = "" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
        error = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['ms']:.2f} | {r['x_floor']:.2f} | {extra} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=("cross_entropy", "jsd"), default="cross_entropy")
    parser.add_argument("--quick", action="store_true", help="only N=8192, V=128256, automatic chunks")
    parser.add_argument("--chunks", help="comma-separated rows per chunk to measure besides the automatic "
                        f"chunk (default: {','.join(map(str, CHUNKS))}; none with --quick)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_flce: no CUDA device; this benchmark only measures GPUs.")
        return 0
    import liger_compile  # noqa: F401  (registers the ops and the backend)

    chunks = None if args.chunks is None else tuple(int(c) for c in args.chunks.split(","))
    rows = run(args.quick, args.loss, chunks)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_flce" if args.loss == "cross_entropy" else "bench_fused_linear_jsd")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, torch.cuda.get_device_name()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
