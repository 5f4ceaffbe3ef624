"""Regenerate the benchmark figures and README's end-to-end table from the JSON results in benchmarks/results/.

- ``e2e_<preset>.png``: tokens/s and peak memory per mode, from each ``bench_e2e_<preset>_B<b>_T<t>.json``;
- ``e2e_<preset>_max_<batch|seq>.png``: tokens/s at each batch or length a mode trained, from the searches;
- ``ops.png``: per op, each implementation's forward+backward GPU time and peak memory relative to Inductor's, from
  the newest ``bench_ops_*.json`` holding that op;
- README.md: the section between ``<!-- bench_e2e:begin -->`` and ``<!-- bench_e2e:end -->`` becomes the
  end-to-end tables (markdown from the same JSON) and links to the figures.

    python benchmarks/report.py          (figures need matplotlib; without it only README is rewritten)
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- bench_e2e:begin -->", "<!-- bench_e2e:end -->"

sys.path.insert(0, HERE)
from bench_e2e import markdown  # noqa: E402


def load(pattern: str) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            found.append((os.path.splitext(os.path.basename(path))[0], json.load(f)))
    return found


def save_e2e_figure(plt, figure, stem: str, result: dict, fontsize: int) -> str:
    """Titles `figure` with the result's title and device, writes it as e2e_<...>.png, and returns that name."""
    figure.suptitle(textwrap.fill(f"{result['title']} ({result['environment']['device']})", 120), fontsize=fontsize)
    figure.tight_layout()
    name = stem.replace("bench_", "") + ".png"
    figure.savefig(os.path.join(RESULTS, name), dpi=110)
    plt.close(figure)
    return name


def e2e_figure(plt, stem: str, result: dict) -> str:
    rows = [r for r in result["rows"] if "error" not in r]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["mode"] for r in rows]
    speed.barh(names, [r["tokens_per_s"] / 1e3 for r in rows], color="tab:blue")
    speed.set_xlabel("thousand tokens/s")
    memory.barh(names, [r["peak_gib"] for r in rows], color="tab:orange")
    memory.set_xlabel("peak GiB")
    memory.set_yticklabels([])
    return save_e2e_figure(plt, figure, stem, result, fontsize=10)


def search_figure(plt, stem: str, result: dict) -> str:
    kind = result.get("search", "batch" if stem.endswith("max_batch") else "seq")
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        trained = sorted((r for r in result["rows"] if r["mode"] == mode and "error" not in r), key=lambda r: r[kind])
        speed.plot([r[kind] for r in trained], [r["tokens_per_s"] / 1e3 for r in trained], marker="o", label=mode)
        memory.plot([r[kind] for r in trained], [r["peak_gib"] for r in trained], marker="o", label=mode)
    for axis, label in ((speed, "thousand tokens/s"), (memory, "peak GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"{kind} (the largest each mode trains)")
        axis.set_ylabel(label)
    memory.legend(fontsize=8)
    return save_e2e_figure(plt, figure, stem, result, fontsize=9)


def ops_figure(plt) -> str | None:
    newest: dict[str, tuple[float, list[dict]]] = {}
    for path in glob.glob(os.path.join(RESULTS, "bench_ops_*.json")):
        with open(path) as f:
            rows = json.load(f)["rows"]
        for op in {r["op"] for r in rows}:
            first_shape = next(r["shape"] for r in rows if r["op"] == op)
            if op not in newest or os.path.getmtime(path) > newest[op][0]:
                newest[op] = (os.path.getmtime(path), [r for r in rows if r["op"] == op and r["shape"] == first_shape])
    if not newest:
        return None
    implementations = ["eager", "liger-kernel", "liger-compile op", "liger-compile backend"]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    ops = sorted(newest)
    width = 0.8 / len(implementations)
    for index, impl in enumerate(implementations):
        times, peaks = [], []
        for op in ops:
            rows = {r["impl"]: r for r in newest[op][1]}
            inductor, row = rows.get("inductor"), rows.get(impl)
            times.append(row["fwd_bwd_ms"] / inductor["fwd_bwd_ms"] if row and inductor else 0)
            peaks.append(row["peak_mib"] / max(inductor["peak_mib"], 1) if row and inductor else 0)
        positions = [i + (index - len(implementations) / 2 + 0.5) * width for i in range(len(ops))]
        speed.bar(positions, times, width, label=impl)
        memory.bar(positions, peaks, width, label=impl)
    for axis, label in ((speed, "fwd+bwd GPU time / Inductor's (log)"), (memory, "peak memory / Inductor's")):
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(ops)), ops, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(label)
    speed.set_yscale("log")  # eager is up to 20x slower; memory ratios (liger-kernel's in-place ops: ~0) stay linear
    speed.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, "ops.png"), dpi=110)
    plt.close(figure)
    return "ops.png"


def readme_section(e2e: list[tuple[str, dict]], figures: dict[str, str]) -> str:
    parts = [BEGIN, "", "<!-- written by benchmarks/report.py from benchmarks/results/bench_e2e_*.json -->", ""]
    for stem, result in e2e:
        parts += [markdown(result).rstrip(), ""]
        if stem in figures:
            parts += [f"![{result['title']}](benchmarks/results/{figures[stem]})", ""]
    if "ops" in figures:
        parts += [f"![per-op time and memory relative to Inductor](benchmarks/results/{figures['ops']})", ""]
    return "\n".join(parts + [END])


def main() -> int:
    e2e = load("bench_e2e_*.json")
    figures: dict[str, str] = {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; README only, no figures")
    else:
        for stem, result in e2e:
            figures[stem] = (search_figure if "_max_" in stem else e2e_figure)(plt, stem, result)
        ops = ops_figure(plt)
        if ops:
            figures["ops"] = ops
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"report: README.md has no {BEGIN} ... {END} section to rewrite")
        return 1
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: readme_section(e2e, figures), text,
                  flags=re.S)
    with open(README, "w") as f:
        f.write(text)
    print(f"report: README section rewritten from {len(e2e)} end-to-end result(s); figures: {sorted(figures.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
