"""End-to-end training benchmark: HF models built from configs (random weights, bf16, fused AdamW) trained
eagerly, with Inductor, with liger-kernel's patching, and with liger-compile, each mode in its own process.

Per mode: tokens/s (median step after the warm-up steps), peak memory allocated during the steady steps, time to
the end of the first step (compilation included, from empty compile caches; the JSON splits it into
torch.compile's phases and the Triton kernels compiled in the training process), and the loss of every step (all
modes train on the same ids from the same weights, so the losses must agree up to bf16 noise; the table gives
each mode's largest relative difference from eager's). For our modes the results also say what was compiled:
graphs, rewrites per family, and whether the lm_head fused with the loss.

    python benchmarks/bench_e2e.py [--preset 1b] [--batch 4] [--seq 2048] [--mode eager --mode ...]
        [--steps 12] [--profile] [--out benchmarks/results]
    python benchmarks/bench_e2e.py --max-batch ...   each mode's largest batch (from the preset's, doubling or halving)
    python benchmarks/bench_e2e.py --max-seq 16384,32768,65536 ...   the longest sequence each mode trains at its batch

Modes: eager; inductor (``torch.compile(model)``); liger-kernel (liger-kernel's patching of the model's modules,
when importable); liger-kernel+inductor; liger (``torch.compile(model, backend="liger")``: logits are returned,
so the lm_head is not fused with the loss); liger-optimize (``liger_compile.optimize(model)``: training drops the
logits, and the lm_head fuses with the loss), also with options: ``liger-optimize+residual_norm`` or
``liger-optimize+allow_buffer_reuse=False`` passes ``residual_norm=True`` or ``allow_buffer_reuse=False`` (any
option `optimize` takes, several joined by ``+``). `--profile` writes each mode's top kernels by GPU time over two
steady steps. Only measures on CUDA; on CPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("eager", "inductor", "liger-kernel", "liger-kernel+inductor", "liger", "liger-optimize")
DEFAULT_MODES = ("eager", "inductor", "liger-kernel", "liger-optimize")
WARMUP_STEPS = 3

# Shapes of public checkpoints (random weights). `gc`: activation checkpointing (non-reentrant). `attention`: the
# attn_implementation, SDPA unless transformers refuses it (Gemma 2's soft-capped attention scores).
PRESETS = {
    "1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
               batch=4, seq=2048, gc=False),
    "8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False,
               batch=4, seq=4096, gc=True),
    "qwen3": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  tie_word_embeddings=True, batch=4, seq=2048, gc=False),  # Qwen3-1.7B
    "gemma2": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   batch=2, seq=2048, gc=False, attention="eager"),  # Gemma-2-2B
    "gemma3": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                   num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   batch=4, seq=2048, gc=False),  # Gemma-3-1B
}


def build_model(preset: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in PRESETS[preset].items() if k not in ("model_type", "batch", "seq", "gc", "attention")}
    config = AutoConfig.for_model(PRESETS[preset]["model_type"], max_position_embeddings=131072,
                                  attn_implementation=PRESETS[preset].get("attention", "sdpa"), **settings)
    for name, value in vars(config).items():  # compiled and eager runs would draw different dropout masks
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    if PRESETS[preset]["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def optimize_options(mode: str) -> dict | None:
    """The options of an optimize mode, ``liger-optimize[+name[=value]]...`` (a bare name is True); None for the
    other modes."""
    base, *options = mode.split("+")
    if base != "liger-optimize":
        return None
    named = (option.partition("=") for option in options)
    return {name: ast.literal_eval(value) if equals else True for name, equals, value in named}


def mode_name(text: str) -> str:
    """`--mode`'s type: one of MODES, or an optimize mode whose options `optimize` accepts."""
    if text in MODES:
        return text
    try:
        options = optimize_options(text)
        if options is not None:
            from liger_compile import config

            config.resolve(dict(options))
            return text
    except (ValueError, SyntaxError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{text}: {error}") from error
    raise argparse.ArgumentTypeError(f"{text}: not one of {', '.join(MODES)}, nor liger-optimize+<option>[=value]")


def prepare(mode: str, model):
    """The callable each mode trains with."""
    import torch

    if mode.startswith("liger-kernel"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if mode in ("inductor", "liger-kernel+inductor"):
        return torch.compile(model)
    if mode == "liger":
        return torch.compile(model, backend="liger")
    options = optimize_options(mode)
    if options is not None:
        import liger_compile

        return liger_compile.optimize(model, **options)
    return model


class KernelCompileTimer:
    """Times the Triton kernels compiled in this process, by kernel name: the ones launched outside Inductor's
    generated code (opaque ops, liger-kernel's patching) compile here, serially, on their first launch; Inductor
    compiles its own kernels, and those of traced ops, in its pool of workers."""

    def __init__(self):
        from triton.runtime.jit import JITFunction

        self.seconds: dict[str, float] | None = {}
        timed = getattr(JITFunction, "_do_compile", None)  # Triton 3.x's; another Triton: not measured
        if timed is None:
            self.seconds = None
            return

        def do_compile(function, *args, **kwargs):
            began = time.perf_counter()
            try:
                return timed(function, *args, **kwargs)
            finally:
                name = function.fn.__name__
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

        JITFunction._do_compile = do_compile

    def summary(self) -> dict:
        if self.seconds is None:
            return dict(total_s=None, by_kernel={})
        return dict(total_s=round(sum(self.seconds.values()), 2),
                    by_kernel={k: round(v, 2) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])})


def compile_phases(top: int = 25) -> dict[str, float]:
    """torch.compile's own timers (`torch._dynamo.utils.compile_times`), summed over graphs, the longest first.
    They nest (Dynamo's includes AOTAutograd's, which includes Inductor's), so they do not add up."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    phases = sorted(zip(names, (float(v) for v in values)), key=lambda kv: -kv[1])
    return {name: round(seconds, 2) for name, seconds in phases[:top]}


def run_one(mode: str, preset: str, batch: int, seq: int, steps: int, profile_to: str | None) -> dict:
    """Train `steps` steps in this process; returns the measurements."""
    import torch

    kernel_compiles = KernelCompileTimer()
    model = build_model(preset)
    forward = prepare(mode, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    seconds, losses = [], []
    start = time.perf_counter()
    with rewrites_collected(mode) as report:
        for index in range(steps):
            torch.cuda.synchronize()
            began = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
            if index == 0:
                first_step = time.perf_counter() - start
                torch.cuda.reset_peak_memory_stats()  # steady-state peak: compilation's buffers are gone
    if profile_to:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        with open(profile_to, "w") as f:
            f.write(trace.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
    steady = statistics.median(seconds[WARMUP_STEPS:])
    return dict(mode=mode, preset=preset, batch=batch, seq=seq, tokens_per_s=batch * seq / steady,
                step_ms=steady * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2**30, first_step_s=first_step,
                compile_phases_s=compile_phases(), kernel_compiles=kernel_compiles.summary(),
                losses=[loss.item() for loss in losses], **rewrite_counts(report))


def rewrites_collected(mode: str):
    """The backend's report of every graph our modes compile (recompiles included); nothing for the others."""
    if mode != "liger" and optimize_options(mode) is None:
        return contextlib.nullcontext()
    from liger_compile.report import collect

    return collect()


def rewrite_counts(report) -> dict:
    """A row's `rewrites`: graphs compiled, rewrites per family, and the cross-entropy variants (whether the
    lm_head fused: a graph break before it leaves the logits an output, and the loss unfused)."""
    if report is None:
        return {}
    counts = {family: n for family, n in report.counts().items() if n}
    variants = [r.variant for r in report.rewrites if r.family == "cross_entropy"]
    return dict(rewrites=dict(graphs=len(report.graphs), counts=counts, cross_entropy=variants))


def search_batch(start: int, train) -> list[dict]:
    """The rows of `train(batch)` for the batches a search tries: from `start` (the preset's), doubling while it
    trains, or halving down to 1 until it does; the last row that trained is the largest batch that fits."""
    rows = [train(start)]
    factor = 0.5 if "error" in rows[0] else 2
    batch = start
    while (batch := int(batch * factor)) >= 1:
        rows.append(train(batch))
        if ("error" in rows[-1]) == (factor == 2):  # the first failure going up, the first success going down
            break
    return rows


def walk_lengths(lengths: list[int], train) -> list[dict]:
    """The rows of `train(length)` for `lengths` in order, up to and including the first that fails."""
    rows = []
    for length in lengths:
        rows.append(train(length))
        if "error" in rows[-1]:
            break
    return rows


def in_subprocess(mode: str, preset: str, batch: int, seq: int, steps: int, profile_to: str | None,
                  timeout: int) -> dict:
    """`run_one` in a fresh process with empty compile caches (Inductor's and Triton's are on disk and would
    otherwise carry kernels from one mode's process to the next); an OOM or crash becomes an error row."""
    command = [sys.executable, __file__, "--one", mode, "--preset", preset, "--batch", str(batch), "--seq", str(seq),
               "--steps", str(steps)] + (["--profile-to", profile_to] if profile_to else [])
    row = dict(mode=mode, preset=preset, batch=batch, seq=seq)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_caches_") as caches:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(caches, "triton"))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {**row, "error": f"timed out after {timeout} s"}
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if results:
        return json.loads(results[-1][len("RESULT "):])
    out_of_memory = "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr
    return {**row, "error": "out of memory" if out_of_memory else done.stderr.strip()[-400:]}


def available_modes(requested: list[str] | None) -> list[str]:
    import importlib.util

    modes = list(requested or DEFAULT_MODES)
    if importlib.util.find_spec("liger_kernel") is None:
        skipped = [m for m in modes if m.startswith("liger-kernel")]
        if skipped:
            print(f"bench_e2e: liger-kernel is not importable; skipping {skipped}")
        modes = [m for m in modes if m not in skipped]
    return modes


def progress(items, description: str):
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        return items
    return tqdm(items, desc=description, file=sys.stderr)


def annotate(rows: list[dict]) -> None:
    """Each row's largest relative loss difference from eager's run of the same shape, where there is one."""
    eager = {(r["batch"], r["seq"]): r["losses"] for r in rows if r["mode"] == "eager" and "losses" in r}
    for row in rows:
        reference = eager.get((row["batch"], row["seq"]))
        if reference and "losses" in row:
            row["loss_vs_eager"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], reference))


def environment() -> dict:
    import importlib.metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=version("triton"),
                transformers=version("transformers"), liger_kernel=version("liger-kernel"),
                date=time.strftime("%Y-%m-%d"))


def first_step(row: dict) -> str:
    if row.get("kernel_compiles", {}).get("total_s") is None:
        return f"{row['first_step_s']:.1f}"
    return f"{row['first_step_s']:.1f} ({row['kernel_compiles']['total_s']:.1f})"


def markdown(result: dict) -> str:
    env = result["environment"]
    cold = any("kernel_compiles" in r for r in result["rows"])  # runs before this measure shared warm caches
    lines = [f"{result['title']}. {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}, liger-kernel {env['liger_kernel']}, {env['date']}. bf16 weights, fused AdamW, "
             f"random ids; tokens/s from the median of the steps after {WARMUP_STEPS} warm-up steps; peak: memory "
             "allocated during the steady steps; first step: its end, compilation included"
             + (" (empty compile caches; of it, kernels compiled in the training process)"
                if cold else "") + "; loss vs eager: the "
             "largest relative difference of a step's loss from eager's.", "",
             "| mode | batch × seq | tokens/s | step ms | peak GiB | first step s | loss first → last | loss vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shape = f"{r['batch']} × {r['seq']}"
        if "error" in r:
            lines.append(f"| {r['mode']} | {shape} | {r['error'][:120]} | | | | | |")
            continue
        vs_eager = f"{r['loss_vs_eager']:.1e}" if "loss_vs_eager" in r else ""
        lines.append(f"| {r['mode']} | {shape} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | "
                     f"{first_step(r)} | {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} | {vs_eager} |")
    described = {}
    for r in result["rows"]:
        if "rewrites" in r:
            described.setdefault(r["mode"], r["rewrites"])  # a search's rows of one mode compile alike
    summaries = [f"- {mode}: {rewrite_summary(rewrites)}" for mode, rewrites in described.items()]
    if summaries:
        lines += ["", "What our modes compiled (graphs, rewrites per family):"] + summaries
    if "search" in result:
        lines += ["", f"Largest {result['search']} that trains: " + largest_trained(result["rows"], result["search"])
                  + "."]
    return "\n".join(lines) + "\n"


def rewrite_summary(rewrites: dict) -> str:
    """'1 graph; rms_norm 33, ..., cross_entropy 1 (fused linear)': what a row of our modes compiled."""
    parts = []
    for family, n in rewrites["counts"].items():
        variants = f" ({', '.join(rewrites['cross_entropy'])})" if family == "cross_entropy" else ""
        parts.append(f"{family} {n}{variants}")
    graphs = rewrites["graphs"]
    return f"{graphs} graph{'s' if graphs != 1 else ''}; " + (", ".join(parts) or "nothing rewritten")


def largest_trained(rows: list[dict], kind: str) -> str:
    """Per mode, in the rows' order: the largest `kind` (batch or seq) that trained, and the next one tried, which
    did not."""
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        own = [r for r in rows if r["mode"] == mode]
        largest = max((r[kind] for r in own if "error" not in r), default=0)
        above = sorted((r for r in own if "error" in r and r[kind] > largest), key=lambda r: r[kind])
        failed = f"{above[0][kind]}: {above[0]['error'][:40]}" if above else "no larger one tried"
        parts.append(f"{mode} {largest or 'none'} ({failed})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--batch", type=int, help="default: the preset's")
    parser.add_argument("--seq", type=int, help="default: the preset's")
    parser.add_argument("--mode", action="append", type=mode_name, help=f"default: {', '.join(DEFAULT_MODES)}")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-batch", action="store_true",
                        help="search each mode's largest batch (from --batch: doubling, or halving)")
    parser.add_argument("--max-seq", help="comma-separated lengths: each mode's longest that trains")
    parser.add_argument("--profile", action="store_true", help="write each mode's top kernels by GPU time")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per mode's process")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--one", type=mode_name, help=argparse.SUPPRESS)  # the per-mode process
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    import torch

    if not torch.cuda.is_available():
        print("bench_e2e: no CUDA device; this benchmark only measures GPUs.")
        return 0
    batch, seq = args.batch or PRESETS[args.preset]["batch"], args.seq or PRESETS[args.preset]["seq"]
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.preset, batch, seq, args.steps, args.profile_to)))
        return 0

    os.makedirs(args.out, exist_ok=True)
    modes = available_modes(args.mode)
    rows = []
    if args.max_batch or args.max_seq:
        kind = "batch" if args.max_batch else "seq"
        title = f"Largest {kind} each mode trains, preset {args.preset}, " + (
            f"seq {seq}" if args.max_batch else f"batch {batch}")
        stem = f"bench_e2e_{args.preset}_max_{kind}"
    else:
        title = f"Training steps, preset {args.preset}"
        stem = f"bench_e2e_{args.preset}_B{batch}_T{seq}"
    result = dict(title=title, environment=environment(), preset=PRESETS[args.preset], rows=rows)
    if args.max_batch or args.max_seq:
        result["search"] = kind

    def record() -> None:
        """Writes the results so far after every row: a run cut short (a time limit, a crash) keeps its rows."""
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
        annotate(rows)
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write(markdown(result))

    if args.max_batch or args.max_seq:
        for mode in progress(modes, f"{kind} search"):
            def train(trial: int, mode=mode) -> dict:
                shape = (trial, seq) if args.max_batch else (batch, trial)
                rows.append(in_subprocess(mode, args.preset, *shape, min(args.steps, WARMUP_STEPS + 2), None,
                                          args.timeout))
                record()
                return rows[-1]
            if args.max_batch:
                search_batch(batch, train)
            else:
                walk_lengths([int(t) for t in args.max_seq.split(",")], train)
    else:
        for mode in progress(modes, "modes"):
            profile_to = os.path.join(args.out, f"profile_{args.preset}_{mode}.txt") if args.profile else None
            rows.append(in_subprocess(mode, args.preset, batch, seq, args.steps, profile_to, args.timeout))
            record()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
