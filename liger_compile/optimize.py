"""`optimize(model)` compiles with the liger backend; `explain(model, ...)` reports what it would rewrite."""

from __future__ import annotations

import functools
from typing import Any

import torch

from liger_compile import config as liger_config
from liger_compile.backend import liger_backend
from liger_compile.report import Report, collect


def optimize(model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
             fullgraph: bool = False, **options: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="liger")`` with `options` (see `liger_compile.config`) checked now.

    Unlike ``torch.compile``, `mode` and `options` may be given together.
    """
    liger_config.resolve(options)
    backend = functools.partial(liger_backend, mode=mode, options=options)
    return torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through the rewrite passes (no Inductor) and report what they did.

    `model` may already be compiled; its original module is used. The rewritten graph runs eagerly.
    """
    module = getattr(model, "_orig_mod", model)
    backend = functools.partial(liger_backend, options={"compiler": "eager"})
    with collect() as report:
        torch.compile(module, backend=backend)(*args, **kwargs)
    return report
