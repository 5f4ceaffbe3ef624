"""Runs the rewrite families over a Dynamo graph and every graph nested in it, atomically.

A family is a function ``apply(graph, record)`` that finds its patterns in one `fx.Graph`, rewrites the exact
ones and records near-misses. The manager works on a clone of the graph module: if a family raises, the
clone is dropped and the families are run again without it, so a bug in one matcher costs its speed-up,
never the user's training run (``LIGER_COMPILE_STRICT=1`` raises instead).
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from torch import fx

from liger_compile.ops._library import fall_back, one_line
from liger_compile.passes.graph import link_region_operands, location


@dataclass(frozen=True)
class Rewrite:
    family: str
    variant: str  # which spelling or casting mode was matched
    node: str  # the graph node whose value the new op computes
    location: str


@dataclass(frozen=True)
class NearMiss:
    family: str
    reason: str
    node: str
    location: str


@dataclass(frozen=True)
class PassFailure:
    family: str
    error: str  # the exception, one line
    traceback: str


@dataclass
class PassResult:
    """What one run of the passes did to one graph module (and its nested graphs)."""

    rewrites: list[Rewrite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    failures: list[PassFailure] = field(default_factory=list)
    seconds: float = 0.0


class Recorder:
    """Handed to a family's `apply`: collects its rewrites and near-misses."""

    def __init__(self, family: str):
        self.family = family
        self.rewrites: list[Rewrite] = []
        self.near_misses: list[NearMiss] = []

    def rewrite(self, node: fx.Node, variant: str) -> None:
        self.rewrites.append(Rewrite(self.family, variant, node.name, location(node)))

    def near_miss(self, node: fx.Node, reason: str) -> None:
        self.near_misses.append(NearMiss(self.family, reason, node.name, location(node)))


Family = Callable[[fx.Graph, Recorder], None]


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graphs (nested ones too) sharing tensors, constants and Dynamo's bookkeeping."""
    graph = copy.deepcopy(gm.graph)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.__dict__.update(vars(old))  # per-node extras Dynamo reads later, e.g. `_dynamo_source`
    clone = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for key, value in vars(gm).items():
        clone.__dict__.setdefault(key, value)
    clone.meta = dict(getattr(gm, "meta", {}))
    for name, child in list(clone.named_children()):
        if isinstance(child, fx.GraphModule):
            setattr(clone, name, clone_graph_module(child))
    return clone


def graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """`gm` and the graph modules nested in it (bodies of checkpoint regions, torch.cond branches, ...)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


class _FamilyError(Exception):
    def __init__(self, family: str, error: Exception):
        super().__init__(family)
        self.family = family
        self.error = error


def _apply_all(gm: fx.GraphModule, families: dict[str, Family]) -> list[Recorder]:
    link_region_operands(gm)
    recorders = []
    for name, apply in families.items():
        recorder = Recorder(name)
        try:
            for module in graph_modules(gm):
                apply(module.graph, recorder)
                module.graph.lint()
        except Exception as error:
            raise _FamilyError(name, error) from error
        recorders.append(recorder)
    return recorders


def run_passes(gm: fx.GraphModule, families: dict[str, Family]) -> tuple[fx.GraphModule, PassResult]:
    """Apply `families` (in order) to a clone of `gm`; return the rewritten clone and what happened."""
    start = time.perf_counter()
    result = PassResult()
    remaining = dict(families)
    rewritten = gm
    while remaining:
        candidate = clone_graph_module(gm)
        try:
            recorders = _apply_all(candidate, remaining)
        except _FamilyError as failed:
            message = one_line(failed.error)
            trace = "".join(traceback.format_exception(failed.error))
            result.failures.append(PassFailure(failed.family, message, trace))
            fall_back(f"the {failed.family} rewrite failed ({message}); compiling without it", failed.error)
            del remaining[failed.family]
            continue
        for module in graph_modules(candidate):
            module.recompile()
        for recorder in recorders:
            result.rewrites.extend(recorder.rewrites)
            result.near_misses.extend(recorder.near_misses)
        rewritten = candidate
        break
    result.seconds = time.perf_counter() - start
    return rewritten, result
