"""`optimize(model)` compiles with the liger backend; `explain(model, ...)` reports what it would rewrite."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from liger_compile import config as liger_config
from liger_compile.backend import liger_backend
from liger_compile.report import Report, collect


def optimize(model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
             fullgraph: bool = False, keep_logits: bool = False, **options: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="liger")`` with `options` (see `liger_compile.config`) checked now.

    Unlike ``torch.compile``, `mode` and `options` may be given together.

    In training mode, when the model's output (an HF ``ModelOutput`` or any mapping with a ``logits`` entry) has
    a loss, its logits are dropped from the output (``output.logits`` is None) inside the compiled region, so
    the lm_head and the loss fuse and the (tokens x vocab) logits are never materialised. `keep_logits=True`
    returns them (the loss is then computed from the materialised logits). Evaluation mode always keeps them.
    """
    liger_config.resolve(options)
    backend = functools.partial(liger_backend, mode=mode, options=options)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    if not keep_logits:
        compiled.forward = compiled.dynamo_ctx(functools.partial(_without_training_logits, model))
    return compiled


def _without_training_logits(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    output = model(*args, **kwargs)
    if not (model.training and isinstance(output, Mapping) and output.get("loss") is not None
            and output.get("logits") is not None):
        return output
    return type(output)(**{key: value for key, value in output.items() if key != "logits"})


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through the rewrite passes (no Inductor) and report what they did.

    `model` may already be compiled; its original module is used. The rewritten graph runs eagerly.
    """
    module = getattr(model, "_orig_mod", model)
    backend = functools.partial(liger_backend, options={"compiler": "eager"})
    with collect() as report:
        torch.compile(module, backend=backend)(*args, **kwargs)
    return report
