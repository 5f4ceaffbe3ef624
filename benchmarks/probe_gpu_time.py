"""Where a training step's GPU time goes, and where the GPU idles: `torch.profiler` (CUDA and CPU activity) over
two steady steps of one bench_e2e mode, after four warm-up steps. Writes ``gaps_<mode>.json.gz`` under --out: a
summary (step times, GPU busy and idle time, the longest gaps with the kernels on either side) and the trace's
complete events, for a closer look.

    python benchmarks/probe_gpu_time.py --mode liger-optimize [--preset 1b] --out /tmp/probe

Only measures on CUDA; on CPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import torch

import bench_e2e

WARMUP_STEPS, PROFILED_STEPS = 4, 2
_KEPT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", "cpu_op", "user_annotation")


def gpu_time(events: list[dict]) -> dict:
    """Busy and idle time of the GPU between its first and last kernel, and the longest gaps."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, gaps = 0.0, []
    end, last_name = kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, last_name, name))
        if stop > end:
            busy += stop - max(start, end)
            end, last_name = stop, name
    span = kernels[-1][1] - kernels[0][0]
    gaps.sort(reverse=True)
    return dict(gpu_span_ms=span / 1e3, gpu_busy_ms=busy / 1e3, gpu_idle_ms=(span - busy) / 1e3,
                kernels=len(kernels), longest_gaps_us=[(round(g, 1), before, after) for g, before, after in gaps[:40]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", type=bench_e2e.mode_name, required=True)
    parser.add_argument("--preset", choices=sorted(bench_e2e.PRESETS), default="1b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_gpu_time: no CUDA device; nothing measured")
        return
    model = bench_e2e.build_model(args.preset)
    forward = bench_e2e.prepare(args.mode, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    preset = bench_e2e.PRESETS[args.preset]
    ids = torch.randint(0, model.config.vocab_size, (preset["batch"], preset["seq"]), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def step():
        torch.cuda.synchronize()
        began = time.perf_counter()
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - began

    for _ in range(WARMUP_STEPS):
        step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        step_ms = [step() * 1e3 for _ in range(PROFILED_STEPS)]
    path = os.path.join(args.out, f"trace_{args.mode}.json")
    trace.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    os.remove(path)
    summary = dict(mode=args.mode, preset=args.preset, profiled_steps=PROFILED_STEPS,
                   step_ms=[round(ms, 2) for ms in step_ms], **gpu_time(events))
    kept = [{k: e.get(k) for k in ("name", "cat", "ts", "dur", "tid", "args")} for e in events
            if e.get("cat") in _KEPT_CATEGORIES]
    with gzip.open(os.path.join(args.out, f"gaps_{args.mode}.json.gz"), "wt") as f:
        json.dump(dict(summary=summary, events=kept), f)
    print(json.dumps({k: v for k, v in summary.items() if k != "longest_gaps_us"}))


if __name__ == "__main__":
    main()
