"""The ``liger`` torch.compile backend: rewrite the Dynamo graph onto liger ops, then compile the rest.

Rewriting happens on the torch-IR graph Dynamo hands over, before AOTAutograd, so AOTAutograd traces the
autograd formulas registered for the liger ops and the backward graph calls their backward kernels.

Nothing of ours stops a run: a rewrite family that raises is dropped (see `liger_compile.passes.manager`), and a
graph whose liger kernels Triton cannot compile is compiled again without rewrites, each with a one-line warning
(``LIGER_COMPILE_STRICT=1``: an error instead).

Before it compiles, the backend makes torch's Triton mutation analysis memoized (`liger_compile.triton_analysis`):
without it torch analyses the same few kernels at every launch (22 s of a 16-layer Llama's compile, torch 2.11).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import torch
from torch import fx

from liger_compile import config as liger_config
from liger_compile.ops._library import FallbackRefused, fall_back, from_triton, one_line
from liger_compile.passes import FAMILIES, PassFailure, PassResult, run_passes
from liger_compile.report import publish
from liger_compile.triton_analysis import memoize_mutation_analysis


def rewrite(gm: fx.GraphModule, config: liger_config.Config) -> tuple[fx.GraphModule, PassResult]:
    """Run the enabled rewrite families on `gm`; on any internal error return `gm` untouched."""
    try:
        return run_passes(gm, {name: FAMILIES[name] for name in config.families})
    except FallbackRefused:  # strict mode, raised where a family failed: already says what and why
        raise
    except Exception as error:  # the pass manager itself failed: never take the user's run down with it
        fall_back(f"rewriting failed ({one_line(error)}); compiling the graph unchanged", error)
        return gm, PassResult(failures=[PassFailure("*", one_line(error), traceback.format_exc())])


def compile_rewritten(gm: fx.GraphModule, example_inputs: list[Any], mode: str | None,
                      config: liger_config.Config) -> Callable:
    if config.compiler == "inductor":
        # Inductor's own torch.compile wrapper: it maps `mode` and validates options exactly as
        # torch.compile(backend="inductor", mode=..., options=...) does.
        return torch._TorchCompileInductorWrapper(mode, config.inductor_options, None)(gm, example_inputs)
    if mode not in (None, "default"):
        raise ValueError(f"liger backend: mode={mode!r} needs compiler='inductor', got {config.compiler!r}")
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(config.compiler)(gm, example_inputs)


def liger_backend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                  options: dict[str, Any] | None = None) -> Callable:
    """torch.compile backend: ``torch.compile(model, backend="liger", mode=..., options=...)``.

    See `liger_compile.config` for `options`; `mode` is Inductor's (``"reduce-overhead"``, ...).
    """
    config = liger_config.resolve(options)
    rewritten, result = rewrite(gm, config)  # a rewritten clone: `gm` stays as it was
    publish(result)
    memoize_mutation_analysis()
    try:
        return compile_rewritten(rewritten, example_inputs, mode, config)
    except Exception as error:
        if not result.rewrites or not from_triton(error):
            raise
        families = sorted({r.family for r in result.rewrites})
        fall_back(f"a Triton kernel of the {', '.join(families)} rewrite(s) failed to compile ({one_line(error)}); "
                  "compiling the graph without rewrites", error)
        return compile_rewritten(gm, example_inputs, mode, config)
