"""Where a training step's memory and compile time go, for one mode of benchmarks/bench_e2e.py (README, "End to
end"): the tensors autograd saves for backward, by shape and dtype (parameters left out); memory before and after
forward and at the peak; the first step's time and torch.compile's compile-time counters; with ``--history``, a
CUDA memory history of one step, replayed to list what is live at its peak.

    python benchmarks/probe_step.py --mode liger-optimize [--preset 1b] [--batch 4] [--seq 2048]
        [--chunk-bytes N] [--history] [--analysis]           (needs CUDA; prints JSON)

``--chunk-bytes`` overrides the fused linear cross-entropy's chunk of logits (`AUTO_CHUNK_BYTES`). ``--analysis``
counts torch's Triton mutation analyses by compile phase: the calls, and those the backend's cache did not answer
(torch 2.11; run it with empty compile caches, or a cached graph skips them).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

import bench_e2e

GIB = 2**30

# Where torch's Triton mutation analysis is called from, by a function on the stack (torch 2.11's names).
ANALYSIS_PHASES = {"triton_kernel_wrapper_mutation_functionalize": "functionalization",
                   "propagate_mutation": "post-grad decomposition", "triton_kernel_wrap_": "lowering"}


def count_mutation_analyses() -> dict | None:
    """Counts, by compile phase, the calls of torch's Triton mutation analysis and those the backend's cache
    (`liger_compile.triton_analysis`) passes on to torch; None on a torch without that function."""
    import traceback

    from torch._higher_order_ops import triton_kernel_wrap

    from liger_compile.triton_analysis import memoize_mutation_analysis

    counts = collections.defaultdict(lambda: {"calls": 0, "analysed": 0, "seconds": 0.0})
    torch_analysis = getattr(triton_kernel_wrap, "identify_mutated_tensors", None)
    if torch_analysis is None:
        return None

    def phase() -> str:
        for frame in reversed(traceback.extract_stack(limit=64)):
            if frame.name in ANALYSIS_PHASES:
                return ANALYSIS_PHASES[frame.name]
        return "elsewhere"

    def analysed(kernel, kwargs, tma_descriptor_metadata):
        began = time.perf_counter()
        try:
            return torch_analysis(kernel, kwargs, tma_descriptor_metadata)
        finally:
            count = counts[phase()]
            count["analysed"] += 1
            count["seconds"] += time.perf_counter() - began

    triton_kernel_wrap.identify_mutated_tensors = analysed
    if not memoize_mutation_analysis():
        return None
    memoized = triton_kernel_wrap.identify_mutated_tensors

    def called(kernel, kwargs, tma_descriptor_metadata):
        counts[phase()]["calls"] += 1
        return memoized(kernel, kwargs, tma_descriptor_metadata)

    called.liger_results = memoized.liger_results  # the backend sees its cache installed
    triton_kernel_wrap.identify_mutated_tensors = called
    return counts


def saved_tensor_groups(step, parameters) -> tuple[float, list]:
    """GiB of distinct storages autograd saves during one `step()`, and their (shape, dtype, count, MiB) groups."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), (tuple(tensor.shape), str(tensor.dtype), storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    groups = collections.defaultdict(lambda: [0, 0])
    for shape, dtype, nbytes in saved.values():
        groups[(shape, dtype)][0] += 1
        groups[(shape, dtype)][1] += nbytes
    rows = sorted(([list(shape), dtype, n, round(nbytes / 2**20, 1)] for (shape, dtype), (n, nbytes) in groups.items()),
                  key=lambda row: -row[3])
    return sum(nbytes for *_, nbytes in saved.values()) / GIB, rows


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame of an allocation outside torch's library (a model's line, one of ours, or a line of
    Inductor's generated code), with its source text."""
    import linecache

    for frame in frames:
        if "/torch/" not in frame["filename"] or "torchinductor" in frame["filename"]:
            source = linecache.getline(frame["filename"], frame["line"]).strip()
            return f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}: {source[:160]}"
    return "torch" if not frames else f"{os.path.basename(frames[0]['filename'])}:{frames[0]['line']}"


def peak_of_history(step) -> dict:
    """Replays the allocations of one `step()`: the peak above the memory before it, the blocks live there by
    size, and the sites that allocated the most of them."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak, index = {}, 0, 0, {}, 0
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], i)
            total += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if total > peak:
            peak, at_peak, index = total, dict(live), i
    sizes = collections.Counter(size for size, _ in at_peak.values())
    sites = collections.defaultdict(lambda: [0, 0])
    for size, allocated in at_peak.values():
        site = sites[allocation_site(trace[allocated].get("frames", []))]
        site[0] += 1
        site[1] += size
    return dict(peak_above_start_gib=peak / GIB, peak_event=f"{index}/{len(trace)}",
                peak_site=allocation_site(trace[index].get("frames", [])),
                live_at_peak=[[round(size / 2**20, 2), n] for size, n in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])],
                sites_at_peak=[[site, n, round(nbytes / 2**20, 1)]
                               for site, (n, nbytes) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:15]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", type=bench_e2e.mode_name, required=True)
    parser.add_argument("--preset", choices=sorted(bench_e2e.PRESETS), default="1b")
    parser.add_argument("--batch", type=int, help="default: the preset's")
    parser.add_argument("--seq", type=int, help="default: the preset's")
    parser.add_argument("--chunk-bytes", type=int, help="the fused linear cross-entropy's chunk of logits")
    parser.add_argument("--history", action="store_true", help="list what is live at the peak of a step")
    parser.add_argument("--analysis", action="store_true",
                        help="count torch's Triton mutation analyses by compile phase, and what the cache saves")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_step: no CUDA device; this probe only measures GPUs.")
        return 0
    if args.chunk_bytes:
        import liger_compile.ops._library as library

        library.AUTO_CHUNK_BYTES = args.chunk_bytes
    batch = args.batch or bench_e2e.PRESETS[args.preset]["batch"]
    seq = args.seq or bench_e2e.PRESETS[args.preset]["seq"]
    kernel_compiles = bench_e2e.KernelCompileTimer()
    analyses = count_mutation_analyses() if args.analysis else None
    model = bench_e2e.build_model(args.preset)
    forward = bench_e2e.prepare(args.mode, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    memory = {}

    def step():
        torch.cuda.synchronize()
        memory["before"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        loss = forward(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        memory["after_forward"] = torch.cuda.memory_allocated() / GIB
        memory["peak_forward"] = torch.cuda.max_memory_allocated() / GIB
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        memory["peak"] = torch.cuda.max_memory_allocated() / GIB

    started = time.perf_counter()
    step()
    first_step = time.perf_counter() - started
    seconds = []
    for _ in range(6):
        began = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - began)
    saved_gib, groups = saved_tensor_groups(step, parameters)
    result = dict(mode=args.mode, preset=args.preset, batch=batch, seq=seq, chunk_bytes=args.chunk_bytes,
                  tokens_per_s=batch * seq / statistics.median(seconds[1:]), first_step_s=first_step,
                  memory_gib=dict(memory), saved_gib=saved_gib, saved_groups=groups,
                  compile_phases_s=bench_e2e.compile_phases(),
                  kernel_compiles=kernel_compiles.summary())
    if args.analysis:
        result["mutation_analyses"] = analyses if analyses is None else {
            phase: {**count, "seconds": round(count["seconds"], 2)} for phase, count in analyses.items()}
    if args.history:
        result["history"] = peak_of_history(step)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
