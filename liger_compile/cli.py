"""``liger-compile demo | explain | bench``: see the backend work on a tiny transformers model, no downloads; run the
GPU benchmarks of a source checkout."""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from liger_compile.optimize import explain, optimize
from liger_compile.report import collect

# Loss parity the demo demands of the liger backend against eager: fp32 on CPU is exact up to reduction
# order; bf16 on GPU only up to bf16 noise.
_PARITY = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def tiny_model(source: str = "llama", *, large: bool = False) -> torch.nn.Module:
    """A causal LM with random weights and dropout off (`large`: GPU-sized), from a transformers model_type or a
    local directory holding a ``config.json``: that config, every option kept, at a tiny size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000) if large else
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512))
    if os.path.isdir(source):
        config = AutoConfig.from_pretrained(source)
        if getattr(config, "head_dim", None) is not None:  # set explicitly by e.g. Qwen3 and Gemma configs
            sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
        config.update({"max_position_embeddings": 4096, **sizes})
    else:
        config = AutoConfig.for_model(source, max_position_embeddings=4096, **sizes)
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _train(model, batches, device) -> tuple[list[float], list[float]]:
    """Losses and wall-clock seconds per step of AdamW training on `batches`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, seconds = [], []
    for ids in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises, so the step time is complete
        seconds.append(time.perf_counter() - start)
    return losses, seconds


def demo(steps: int, compiler: str) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = tiny_model(large=device.type == "cuda").to(device=device, dtype=dtype).train()
    batch, seq = (8, 1024) if device.type == "cuda" else (4, 64)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (batch, seq), generator=generator).to(device)
               for _ in range(steps)]
    print(f"liger-compile demo: {type(base).__name__} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M "
          f"params, random weights) on {device.type}, {dtype}, batch {batch}x{seq}, {steps} AdamW steps\n")

    modes = {"eager": lambda m: m, "liger": lambda m: optimize(m, compiler=compiler)}
    if device.type == "cuda":
        modes = {"eager": modes["eager"], "inductor": torch.compile, "liger": modes["liger"]}
    results = {}
    for name, prepare in modes.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with collect() as report:
            losses, seconds = _train(prepare(copy.deepcopy(base)), batches, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[name] = (losses, seconds, peak)
        if name == "liger":
            print(report, "\n")

    print("step  " + "".join(f"{name + ' loss':>14}" for name in results))
    for step in range(steps):
        print(f"{step:>4}  " + "".join(f"{results[name][0][step]:>14.6f}" for name in results))
    drift = max(abs(a - b) / abs(b) for a, b in zip(results["liger"][0], results["eager"][0]))
    print(f"\nlargest relative loss difference liger vs eager: {drift:.2e} (allowed {_PARITY[dtype]:.0e})")

    if device.type == "cuda":
        print(f"\n{'mode':<10}{'first step s':>14}{'step ms (median)':>18}{'peak GiB':>10}")
        for name, (_, seconds, peak) in results.items():
            steady = statistics.median(seconds[1:]) * 1e3 if len(seconds) > 1 else float("nan")
            print(f"{name:<10}{seconds[0]:>14.1f}{steady:>18.1f}{peak:>10.2f}")
    if drift > _PARITY[dtype]:
        print("FAILED: the liger backend's losses differ from eager's", file=sys.stderr)
        return 1
    return 0


BENCHMARKS = {"ops": "bench_ops.py", "e2e": "bench_e2e.py"}


def bench(which: str, arguments: list[str]) -> int:
    """Run benchmarks/bench_<which>.py of the checkout this package is installed from, with `arguments`."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", BENCHMARKS[which])
    if not os.path.isfile(script):
        print(f"liger-compile bench: {script} not found: the benchmarks come with the source checkout "
              "(pip install -e . from it)", file=sys.stderr)
        return 2
    sys.argv = [script, *arguments]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        return done.code or 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liger-compile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="train a tiny Llama eagerly and with the liger backend")
    run_demo.add_argument("--steps", type=int, default=6)
    run_demo.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                          help="what compiles the graph after the rewrites (aot_eager: no codegen, quicker)")
    run_explain = commands.add_parser("explain", help="print the rewrite report for a tiny transformers model")
    run_explain.add_argument("model", nargs="?", default="llama",
                             help="a transformers model_type, or a directory with a config.json (its model, shrunk)")
    run_bench = commands.add_parser("bench", help="GPU benchmarks: per op, or end-to-end training (needs CUDA)")
    run_bench.add_argument("which", choices=sorted(BENCHMARKS))
    run_bench.add_argument("arguments", nargs=argparse.REMAINDER, help="passed on, e.g. --op rms_norm; --preset 8b")
    args = parser.parse_args(argv)

    if args.command == "demo":
        return demo(args.steps, args.compiler)
    if args.command == "bench":
        return bench(args.which, args.arguments)
    model = tiny_model(args.model).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    print(explain(model, input_ids=ids, labels=ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
