"""The rewrite report: what each backend call rewrote, where, what it left alone and why.

Each call of the backend publishes one `PassResult` (one Dynamo graph: a model can give several through graph
breaks, recompiles or DDP buckets). Results are logged to the ``liger_compile`` logger at INFO and handed to
every `collect()` block that is open, which is how `explain` gathers them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator

from liger_compile.passes import FAMILIES, NearMiss, PassFailure, PassResult, Rewrite

log = logging.getLogger("liger_compile")

_collectors: contextvars.ContextVar[tuple["Report", ...]] = contextvars.ContextVar("liger_reports", default=())


@dataclass
class Report:
    """Rewrites, near-misses and pass failures of one or more compiled graphs."""

    graphs: list[PassResult] = field(default_factory=list)

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    @property
    def failures(self) -> list[PassFailure]:
        return [f for g in self.graphs for f in g.failures]

    @property
    def seconds(self) -> float:
        return sum(g.seconds for g in self.graphs)

    def counts(self) -> dict[str, int]:
        """Rewrites per family, every family listed (zero included), in run order."""
        found = Counter(r.family for r in self.rewrites)
        return {family: found[family] for family in FAMILIES}

    def to_dict(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "counts": self.counts(),
            "rewrites": [asdict(r) for r in self.rewrites],
            "near_misses": [asdict(m) for m in self.near_misses],
            "failures": [{k: v for k, v in asdict(f).items() if k != "traceback"} for f in self.failures],
            "pass_seconds": self.seconds,
        }

    def __str__(self) -> str:
        lines = [f"liger-compile: {len(self.graphs)} graph(s), {self.seconds * 1e3:.1f} ms in rewrite passes"]
        near = Counter(m.family for m in self.near_misses)
        lines.append(f"  {'family':<16}{'rewritten':>10}{'near-misses':>13}")
        for family, count in self.counts().items():
            lines.append(f"  {family:<16}{count:>10}{near[family]:>13}")
        if self.rewrites:
            lines.append("rewrites:")
            width = max(16, *(len(r.variant) + 2 for r in self.rewrites))
            lines += [f"  {r.family:<16}{r.variant:<{width}}{r.location}" for r in self.rewrites]
        if self.near_misses:
            lines.append("left alone (near-misses):")
            lines += [f"  {m.family:<16}{m.location}: {m.reason}" for m in self.near_misses]
        if self.failures:
            lines.append("pass failures (graph compiled without that family):")
            lines += [f"  {f.family:<16}{f.error}" for f in self.failures]
        return "\n".join(lines)


@contextlib.contextmanager
def collect() -> Iterator[Report]:
    """Gather the results of every backend call made inside the block into one Report."""
    report = Report()
    token = _collectors.set(_collectors.get() + (report,))
    try:
        yield report
    finally:
        _collectors.reset(token)


def publish(result: PassResult) -> None:
    """Log one backend call's result and give it to the open `collect()` blocks."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s", Report([result]))
    for report in _collectors.get():
        report.graphs.append(result)
