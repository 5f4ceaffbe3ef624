"""`optimize(model)` compiles with the liger backend; `explain(model, ...)` reports what it would rewrite."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any, Callable

import torch

from liger_compile import config as liger_config
from liger_compile.backend import liger_backend
from liger_compile.report import Report, collect


def optimize(model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
             fullgraph: bool = False, keep_logits: bool = False, inplace: bool = False,
             **options: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="liger")`` with `options` (see `liger_compile.config`) checked now.

    Unlike ``torch.compile``, `mode` and `options` may be given together.

    In training mode, when the model's output (an HF ``ModelOutput`` or any mapping with a ``logits`` entry) has
    a loss, its logits are dropped from the output (``output.logits`` is None) inside the compiled region, so
    the lm_head and the loss fuse and the (tokens x vocab) logits are never materialised. `keep_logits=True`
    returns them (the loss is then computed from the materialised logits). Evaluation mode always keeps them.
    For that, Dynamo must see the loss and the dropping in one graph, so while it traces the model it skips
    transformers' ``Logger.warning_once``: called in every training step of a checkpointed model with
    ``use_cache`` on ("`use_cache=True` is incompatible with gradient checkpointing"), it would break the graph
    before the lm_head.

    `inplace=True` compiles `model` itself (``model.compile``) and returns it: it keeps its class, so code that
    inspects the class (HF's ``Trainer`` finds the label names in its ``forward``) and its ``state_dict`` keys
    (no ``_orig_mod.`` prefix) see the model as it was.
    """
    liger_config.resolve(options)
    backend = functools.partial(liger_backend, mode=mode, options=options)
    if inplace:
        if not keep_logits:
            model.forward = _without_training_logits(model, model.forward)
        model.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        model._compiled_call_impl = _skipping_warnings_once(model._compiled_call_impl)  # what model.compile set
        return model
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    if not keep_logits:
        compiled.forward = compiled.dynamo_ctx(_without_training_logits(model, model))
    compiled.forward = _skipping_warnings_once(compiled.forward)
    return compiled


def _skipping_warnings_once(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call`, during which Dynamo skips transformers' ``logging.Logger.warning_once`` (where transformers is
    loaded) instead of breaking the graph at it: a message shown once is all it does."""
    @functools.wraps(call)
    def skipping(*args: Any, **kwargs: Any) -> Any:
        warning_once = getattr(logging.Logger, "warning_once", None)
        skipped = getattr(torch._dynamo.config, "ignore_logging_functions", None)  # absent in older torch
        if warning_once is None or skipped is None or warning_once in skipped:
            return call(*args, **kwargs)
        skipped.add(warning_once)  # in place and taken back after: config.patch costs ~40 us a call
        try:
            return call(*args, **kwargs)
        finally:
            skipped.discard(warning_once)
    return skipping


def _without_training_logits(model: torch.nn.Module, call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` (the model, or its forward), its training outputs with a loss returned without logits. It has
    forward's signature, which trainers read (HF's Trainer drops the dataset columns forward does not name)."""
    @functools.wraps(model.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        output = call(*args, **kwargs)
        if not (model.training and isinstance(output, Mapping) and output.get("loss") is not None
                and output.get("logits") is not None):
            return output
        return type(output)(**{key: value for key, value in output.items() if key != "logits"})
    return forward


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Run `model(*args, **kwargs)` once through the rewrite passes (no Inductor) and report what they did.

    `model` may already be compiled; its original module is used. The rewritten graph runs eagerly.
    """
    module = getattr(model, "_orig_mod", model)
    backend = functools.partial(liger_backend, options={"compiler": "eager"})
    with collect() as report:
        torch.compile(module, backend=backend)(*args, **kwargs)
    return report
