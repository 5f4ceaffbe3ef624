"""Per-op GPU benchmarks: liger-compile next to eager PyTorch (written as HF modeling code writes it), Inductor
(torch.compile of that eager code) and liger-kernel when it is importable, all measured in one run.

For each implementation: forward, backward and forward+backward GPU time (the summed durations of the
kernels one call runs, from the profiler, so host launch gaps are out; backward = forward+backward -
forward); forward+backward as launched eagerly (`triton.testing.do_bench` median: on a slow host this is
launch-bound and shows each implementation's host overhead); peak memory allocated above the inputs during one
forward+backward (outputs and gradients included, as ../shared/anchors.md counts it); achieved bandwidth over
the op's minimal traffic; and the relative error of output and gradients against eager.

    python benchmarks/bench_ops.py [--op rms_norm] [--op add_rms_norm] [--op layer_norm] [--op glu] [--op rope]
        [--op cross_entropy] [--op divergence] [--op embedding] [--quick] [--out benchmarks/results]

Without CUDA it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import liger_kernel.ops as liger_kernel_ops
except ImportError:  # the peer is optional
    liger_kernel_ops = None


@dataclass
class Case:
    op: str
    shape: str
    make_inputs: Callable[[], tuple]  # the same (seeded) inputs on every call
    grad_inputs: Callable[[tuple], list]  # the inputs that receive gradients
    bytes_moved: int  # fewest bytes a forward+backward must read and write
    impls: Callable[[], dict[str, Callable]]  # built per case, after Dynamo's caches are reset


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    launched_ms: float
    peak_mib: float
    gbps: float
    rel_error: float


# --- RMSNorm --------------------------------------------------------------------------------------------

def hf_rms_norm(x, weight, eps=1e-6):
    """transformers' LlamaRMSNorm.forward."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def norm_sizes(quick: bool) -> list[tuple[int, int]]:
    """(rows, hidden) of the norm benchmarks: Llama-3-8B's, then a hidden-size sweep of the same total size."""
    sweep = [(16384 * 4096 // hidden, hidden) for hidden in (1024, 2048, 8192, 16384)]
    return [(16384, 4096)] + ([] if quick else sweep)


def rms_norm_cases(quick: bool) -> list[Case]:
    cases = []
    for rows, hidden in norm_sizes(quick):
        def make_inputs(rows=rows, hidden=hidden):
            torch.manual_seed(0)
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            return x, weight

        def impls():
            found = {
                "eager": hf_rms_norm,
                "inductor": torch.compile(hf_rms_norm, dynamic=False),
                "liger-compile op": lambda x, w: torch.ops.liger.rms_norm(x, w, 1e-6),
                "liger-compile backend": torch.compile(hf_rms_norm, backend="liger", dynamic=False),
            }
            if liger_kernel_ops is not None:
                found["liger-kernel"] = lambda x, w: liger_kernel_ops.LigerRMSNormFunction.apply(
                    x, w, 1e-6, 0.0, "llama", False)
            return found

        cases.append(Case("rms_norm", f"{rows}x{hidden} bf16", make_inputs, lambda i: list(i),
                          5 * rows * hidden * 2, impls))
    return cases


def add_rms_norm_cases(quick: bool) -> list[Case]:
    """A pre-norm block's residual sum and its next norm: h = x + residual, y = norm(h), both returned."""
    cases = []
    for rows, hidden in norm_sizes(quick):
        def make_inputs(rows=rows, hidden=hidden):
            torch.manual_seed(0)
            x, residual = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(2))
            weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            return x, residual, weight

        def eager(x, residual, weight):
            h = x + residual
            return hf_rms_norm(h, weight), h

        def impls():
            return {
                "eager": eager,
                "inductor": torch.compile(eager, dynamic=False),
                "liger-compile op": lambda x, r, w: torch.ops.liger.add_rms_norm(x, r, w, 1e-6),
                "liger-compile backend": torch.compile(eager, backend="liger", dynamic=False,
                                                       options={"residual_norm": True}),
                "liger-compile backend, unfused": torch.compile(eager, backend="liger", dynamic=False),
            }

        cases.append(Case("add_rms_norm", f"{rows}x{hidden} bf16", make_inputs, lambda i: list(i),
                          8 * rows * hidden * 2, impls))  # x, r, dy, dh read; y, h, dx written; h read again
    return cases


# --- LayerNorm ------------------------------------------------------------------------------------------

def layer_norm_cases(quick: bool) -> list[Case]:
    cases = []
    for rows, hidden in norm_sizes(quick):
        def make_inputs(rows=rows, hidden=hidden):
            torch.manual_seed(0)
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            bias = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            return x, weight, bias

        def impls(hidden=hidden):
            def eager(x, w, b):  # nn.LayerNorm's forward
                return F.layer_norm(x, (hidden,), w, b, 1e-5)

            found = {
                "eager": eager,
                "inductor": torch.compile(eager, dynamic=False),
                "liger-compile op": lambda x, w, b: torch.ops.liger.layer_norm(x, w, b, 1e-5),
                "liger-compile backend": torch.compile(eager, backend="liger", dynamic=False),
            }
            if liger_kernel_ops is not None:
                found["liger-kernel"] = lambda x, w, b: liger_kernel_ops.LigerLayerNormFunction.apply(x, w, b, 1e-5)
            return found

        cases.append(Case("layer_norm", f"{rows}x{hidden} bf16", make_inputs, lambda i: list(i),
                          5 * rows * hidden * 2, impls))
    return cases


# --- SwiGLU / GeGLU ---------------------------------------------------------------------------------------

def _liger_kernel_function(name: str):
    return getattr(liger_kernel_ops, name, None) if liger_kernel_ops is not None else None


def glu_cases(quick: bool) -> list[Case]:
    """act(a) * b at Llama-3-8B's MLP width, then the whole MLP block (three Linears and the activation)."""
    sizes = [(16384, 14336)] if quick else [(16384, 14336), (4096, 14336), (16384, 4096)]
    cases = []
    for op, eager, peer in [("swiglu", lambda a, b: F.silu(a) * b, "LigerSiLUMulFunction"),
                            ("geglu", lambda a, b: F.gelu(a, approximate="tanh") * b, "LigerGELUMulFunction")]:
        for rows, cols in sizes if op == "swiglu" else sizes[:1]:
            def make_inputs(rows=rows, cols=cols):
                torch.manual_seed(0)
                return tuple(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                             for _ in range(2))

            def impls(op=op, eager=eager, peer=peer):
                found = {
                    "eager": eager,
                    "inductor": torch.compile(eager, dynamic=False),
                    "liger-compile op": getattr(torch.ops.liger, op),
                    "liger-compile backend": torch.compile(eager, backend="liger", dynamic=False),
                }
                function = _liger_kernel_function(peer)
                if function is not None:  # note: its backward overwrites a and b with their gradients
                    found["liger-kernel"] = function.apply
                return found

            # forward reads a, b and writes y; backward reads dy, a, b and writes da, db
            cases.append(Case(op, f"{rows}x{cols} bf16", make_inputs, lambda i: list(i), 8 * rows * cols * 2,
                              impls))
    if not quick:
        cases += [mlp_case(16384, 4096, 14336), mlp_case(8192, 4096, 14336, layers=4)]
    return cases


def mlp_case(rows: int, hidden: int, intermediate: int, layers: int = 1) -> Case:
    """`layers` residual Llama MLP blocks: with several, what each block saves for backward adds up."""
    def llama_mlp(x, gate, up, down, act_mul):
        """transformers' LlamaMLP.forward with the Linears as functions."""
        return F.linear(act_mul(F.linear(x, gate), F.linear(x, up)), down)

    def stack(act_mul):
        def forward(x, *weights):
            for layer in range(layers):
                out = llama_mlp(x, *weights[3 * layer:3 * layer + 3], act_mul)
                x = out if layers == 1 else x + out
            return x
        return forward

    def make_inputs():
        torch.manual_seed(0)
        scale = hidden ** -0.5
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weights = [(torch.randn(shape, device="cuda") * scale).to(torch.bfloat16).requires_grad_()
                   for _ in range(layers)
                   for shape in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))]
        return (x, *weights)

    def impls():
        eager = stack(lambda a, b: F.silu(a) * b)
        found = {
            "eager": eager,
            "inductor": torch.compile(eager, dynamic=False),
            "liger-compile backend": torch.compile(eager, backend="liger", dynamic=False),
        }
        function = _liger_kernel_function("LigerSiLUMulFunction")
        if function is not None:
            found["liger-kernel"] = stack(function.apply)
        return found

    name = "llama_mlp" if layers == 1 else f"llama_mlp x{layers}"
    return Case(name, f"{rows}x{hidden}x{intermediate} bf16", make_inputs, lambda i: list(i), 0, impls)


# --- RoPE -----------------------------------------------------------------------------------------------

def hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' Llama apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin


def rope_cases(quick: bool) -> list[Case]:
    """q and k of Llama-3-8B's attention (32 / 8 heads of 128): the projections' outputs are the inputs, viewed
    as (B, H, T, D) heads inside each implementation as HF attention does (leaf views would make autograd
    copy every gradient into the view's layout, for all implementations alike)."""
    sizes = [(4, 4096)] if quick else [(4, 4096), (1, 4096), (8, 1024)]
    heads_q, heads_k, head_dim = 32, 8, 128
    cases = []
    for batch, seq in sizes:
        def make_inputs(batch=batch, seq=seq):
            torch.manual_seed(0)
            projections = [torch.randn(batch, seq, n * head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for n in (heads_q, heads_k)]
            positions = torch.randint(0, 8192, (batch, seq), device="cuda")  # any position ids, per row
            inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
            emb = (positions[..., None].float() * inv_freq).repeat(1, 1, 2)
            return (*projections, emb.cos().bfloat16(), emb.sin().bfloat16())

        def on_heads(apply):
            def fn(q_proj, k_proj, cos, sin):
                def heads(x):
                    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)
                return apply(heads(q_proj), heads(k_proj), cos, sin)
            return fn

        def impls():
            found = {
                "eager": on_heads(hf_apply_rotary_pos_emb),
                "inductor": torch.compile(on_heads(hf_apply_rotary_pos_emb), dynamic=False),
                "liger-compile op": on_heads(lambda q, k, cos, sin: torch.ops.liger.rope_pair(
                    q, k, cos.unsqueeze(1), sin.unsqueeze(1))),
                "liger-compile backend": torch.compile(on_heads(hf_apply_rotary_pos_emb), backend="liger",
                                                       dynamic=False),
            }
            function = _liger_kernel_function("LigerRopeFunction")
            if function is not None:  # note: rotates q and k in place, and the output gradients in backward
                found["liger-kernel"] = on_heads(function.apply)
            return found

        # forward reads q, k and writes both rotated; backward reads their gradients and writes q's and k's
        elements = batch * seq * (heads_q + heads_k) * head_dim
        cases.append(Case("rope", f"{batch}x{heads_q}/{heads_k}x{seq}x{head_dim} bf16", make_inputs,
                          lambda i: list(i[:2]), 4 * elements * 2, impls))
    return cases


def hf_causal_lm_cross_entropy(logits, target):
    """transformers' ForCausalLMLoss on already shifted, flattened labels: upcast, then F.cross_entropy."""
    return F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="mean")


def cross_entropy_cases(quick: bool) -> list[Case]:
    """Llama-3's vocabulary over 8192 rows, 1 label in 7 ignored (padding, prompts)."""
    sizes = [(8192, 128256)] if quick else [(8192, 128256), (4096, 262144), (8192, 32000)]
    cases = []
    for rows, vocab in sizes:
        def make_inputs(rows=rows, vocab=vocab):
            torch.manual_seed(0)
            logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            target = torch.randint(0, vocab, (rows,), device="cuda")
            target[::7] = -100
            return logits, target

        def impls():
            found = {
                "eager": hf_causal_lm_cross_entropy,
                "inductor": torch.compile(hf_causal_lm_cross_entropy, dynamic=False),
                "liger-compile op": lambda logits, target: torch.ops.liger.cross_entropy(logits, target),
                "liger-compile backend": torch.compile(hf_causal_lm_cross_entropy, backend="liger", dynamic=False),
            }
            function = _liger_kernel_function("LigerCrossEntropyFunction")
            if function is not None:  # note: writes the logits' gradient over the logits in forward
                def liger_kernel(logits, target):
                    out = function.apply(logits, target, None, -100)
                    return out[0] if isinstance(out, tuple) else out
                found["liger-kernel"] = liger_kernel
            return found

        # forward reads the logits; backward reads them again and writes their gradient
        cases.append(Case("cross_entropy", f"{rows}x{vocab} bf16", make_inputs, lambda i: [i[0]],
                          3 * rows * vocab * 2, impls))
    return cases


# --- KL divergence / JSD -----------------------------------------------------------------------------------

def anchor_jsd(student, teacher):
    """The JSD (beta 0.5) of ../shared/anchors.md, on log-probabilities: upcast, then the mixture's arithmetic."""
    student, teacher = student.float(), teacher.float()
    log_mixture = (0.5 * (student.exp() + teacher.exp())).log()
    return 0.5 * (F.kl_div(log_mixture, teacher, reduction="sum", log_target=True)
                  + F.kl_div(log_mixture, student, reduction="sum", log_target=True)) / student.shape[0]


def distillation_kl(student, teacher):
    """Forward KL(teacher || student) on log-probabilities, as a distillation loss writes it."""
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def divergence_cases(quick: bool) -> list[Case]:
    """Student and teacher log-probabilities (4096, Llama-3's vocabulary), bf16; only the student needs a
    gradient."""
    rows, vocab = 4096, 128256

    def make_inputs():
        torch.manual_seed(0)
        student = torch.randn(rows, vocab, device="cuda").log_softmax(-1).bfloat16().requires_grad_()
        teacher = torch.randn(rows, vocab, device="cuda").log_softmax(-1).bfloat16()
        return student, teacher

    def jsd_impls():
        found = {"eager": anchor_jsd, "inductor": torch.compile(anchor_jsd, dynamic=False),
                 "liger-compile op": lambda s, t: torch.ops.liger.jsd(s, t, None, 0.5),
                 "liger-compile backend": torch.compile(anchor_jsd, backend="liger", dynamic=False)}
        function = _liger_kernel_function("LigerJSDFunction")
        if function is not None:
            found["liger-kernel"] = lambda s, t: function.apply(s, t, None, 0.5, -100)
        return found

    def kl_impls():
        found = {"eager": distillation_kl, "inductor": torch.compile(distillation_kl, dynamic=False),
                 "liger-compile op": lambda s, t: torch.ops.liger.kl_div(s, t, "batchmean", True),
                 "liger-compile backend": torch.compile(distillation_kl, backend="liger", dynamic=False)}
        function = _liger_kernel_function("LigerKLDivLossFunction")
        if function is not None:
            found["liger-kernel"] = lambda s, t: function.apply(s, t, "batchmean", True)
        return found

    shape = f"{rows}x{vocab} bf16"
    # The least any implementation moves: both sides read once, the student's gradient written once.
    return [Case("jsd", shape, make_inputs, lambda i: [i[0]], 3 * rows * vocab * 2, jsd_impls),
            Case("kl_div", shape, make_inputs, lambda i: [i[0]], 3 * rows * vocab * 2, kl_impls)]


# --- Embedding --------------------------------------------------------------------------------------------

def embedding_cases(quick: bool) -> list[Case]:
    """Llama-3's token embedding (128256 x 4096, bf16) looked up by 16384 ids: uniform ids, then ids as skewed as
    text's (Zipf, exponent 1: the most frequent id is ~8% of them), whose long segments a deterministic backward
    sums in one program each."""
    vocab, hidden, n_ids = 128256, 4096, 16384
    cases = []
    for distribution in ["uniform"] if quick else ["uniform", "zipf"]:
        def make_inputs(distribution=distribution):
            torch.manual_seed(0)
            weight = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            if distribution == "uniform":
                ids = torch.randint(0, vocab, (4, n_ids // 4), device="cuda")
            else:
                frequencies = 1.0 / torch.arange(1, vocab + 1, device="cuda", dtype=torch.float64)
                ids = torch.multinomial(frequencies, n_ids, replacement=True).view(4, n_ids // 4)
            return ids, weight

        def eager(ids, weight):
            return F.embedding(ids, weight)

        def impls():
            found = {"eager": eager, "inductor": torch.compile(eager, dynamic=False),
                     "liger-compile op": torch.ops.liger.embedding,
                     "liger-compile backend": torch.compile(eager, backend="liger", dynamic=False)}
            function = _liger_kernel_function("LigerEmbeddingFunction")
            if function is not None:
                found["liger-kernel"] = lambda ids, weight: function.apply(weight, ids)
            return found

        # forward reads and writes the looked-up rows; backward reads their gradient and writes the whole weight's
        cases.append(Case("embedding", f"{n_ids} ids {distribution}, {vocab}x{hidden} bf16", make_inputs,
                          lambda i: [i[1]], (3 * n_ids + vocab) * hidden * 2, impls))
    return cases


CASES = {"rms_norm": rms_norm_cases, "add_rms_norm": add_rms_norm_cases, "layer_norm": layer_norm_cases,
         "glu": glu_cases, "rope": rope_cases, "cross_entropy": cross_entropy_cases, "divergence": divergence_cases,
         "embedding": embedding_cases}


# --- measuring ------------------------------------------------------------------------------------------

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def gpu_ms(fn: Callable, iters: int = 20) -> float:
    """Milliseconds of device time per call of `fn`: the kernels' own durations, without the host's gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return sum(e.time_range.elapsed_us() for e in kernels) / iters / 1e3


def measure(case: Case, name: str, fn: Callable, reference: tuple[torch.Tensor, ...] | None):
    """Time and measure one implementation; returns the Row and its (outputs + gradients)."""
    import triton

    inputs = case.make_inputs()
    grads_of = case.grad_inputs(inputs)
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(1)
    # the same values for every implementation, each in its output's memory layout (randn_like would fill
    # memory in order, giving other values to an output laid out otherwise)
    cotangents = [torch.empty_like(o).copy_(torch.randn(o.shape, device=o.device, dtype=o.dtype)) for o in outputs]
    inputs = case.make_inputs()  # fresh: an implementation may have rotated or overwritten its inputs in place
    grads_of = case.grad_inputs(inputs)

    def forward():
        return fn(*inputs)

    def step():
        for t in grads_of:
            t.grad = None
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), cotangents)

    step()
    results = tuple(o.detach() for o in outputs) + tuple(t.grad for t in grads_of)
    rel_error = 0.0 if reference is None else max(relative_error(a, b) for a, b in zip(results, reference))
    fwd, fwd_bwd = gpu_ms(forward), gpu_ms(step)
    launched = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")

    for t in grads_of:
        t.grad = None
    del outputs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    row = Row(case.op, case.shape, name, fwd, fwd_bwd - fwd, fwd_bwd, launched, peak,
              case.bytes_moved / fwd_bwd / 1e6, rel_error)  # GB/s is 0 where no minimal traffic is defined
    return row, results


def run(ops: list[str], quick: bool) -> list[Row]:
    rows = []
    for op in ops:
        for case in CASES[op](quick):
            reference = None
            torch._dynamo.reset()
            for name, fn in case.impls().items():  # eager first: the others are checked against its results
                row, results = measure(case, name, fn, reference)
                reference = reference or results
                rows.append(row)
                print(f"{row.op:<14}{row.shape:<22}{row.impl:<24}{row.fwd_ms:>8.3f}{row.bwd_ms:>8.3f}"
                      f"{row.fwd_bwd_ms:>9.3f}{row.launched_ms:>10.3f}{row.peak_mib:>7.0f}{row.gbps:>7.0f}"
                      f"{row.rel_error:>9.1e}", flush=True)
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], device: str) -> str:
    lines = [f"Measured on {device}, torch {torch.__version__}, bf16. fwd, bwd, fwd+bwd: GPU time, summed "
             "kernel durations per call (bwd = fwd+bwd − fwd); launched: fwd+bwd launched eagerly (`do_bench`), "
             "host overhead included; MiB: peak allocated above the inputs during one fwd+bwd; GB/s: the op's "
             "minimal traffic over fwd+bwd; error: max relative (L2) error of output and gradients vs eager.", "",
             "| op | shape | implementation | fwd ms | bwd ms | fwd+bwd ms | launched ms | MiB | GB/s | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.op} | {r.shape} | {r.impl} | {r.fwd_ms:.3f} | {r.bwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | "
              f"{r.launched_ms:.3f} | {r.peak_mib:.0f} | {r.gbps:.0f} | {r.rel_error:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(CASES), help="op to measure (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the Llama-3-8B shape")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: no CUDA device; these benchmarks only measure GPUs.")
        return 0
    import liger_compile  # noqa: F401  (registers the ops and the backend)

    device = torch.cuda.get_device_name()
    print(f"{device}; liger-kernel {'present' if liger_kernel_ops else 'not importable'}")
    print(f"{'op':<14}{'shape':<22}{'implementation':<24}{'fwd':>8}{'bwd':>8}{'fwd+bwd':>9}{'launched':>10}"
          f"{'MiB':>7}{'GB/s':>7}{'error':>9}")
    rows = run(args.op or sorted(CASES), args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_ops_" + "_".join(args.op or ["all"]))
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
