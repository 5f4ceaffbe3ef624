"""Memoized Triton mutation analysis: torch 2.11 redoes it for every launch of a kernel, three times per compile.

Each `wrap_triton` launch in a graph (our ops are `triton_op`s, so every rms_norm, rope or glu call is one) makes
torch generate the kernel's Triton IR and read off which tensor arguments it writes
(`torch._higher_order_ops.triton_kernel_wrap.identify_mutated_tensors`), at three points of one compile:
functionalization, Inductor's post-grad decomposition and its lowering. Nothing is cached: a 16-layer Llama's
training step ran the analysis 560 times, for 22 s of its compile, on the H200 machine (torch 2.11).

The analysis is a pure function of what torch feeds Triton's code generator: the kernel, each tensor argument's
dtype (torch replaces tensors by 2-element ones of that dtype), symbolic sizes (replaced by 2) and the values of
the other arguments. `memoize_mutation_analysis` wraps torch's function in a cache keyed on exactly that, with
the JITFunction object as the kernel's identity. An autotuner is keyed as its JITFunction with its first config's
arguments added to the call's, which is all the analysis reads of it: torch wraps a kernel launched with
``num_warps=`` (all of ours are) in a new single-config autotuner at every launch, and Inductor's lowering later
passes the bare JITFunction with those arguments, so one result serves every launch of a kernel variant. Calls it
cannot key exactly (real tensors, whose data pointers' alignment Triton specializes on; TMA descriptors; values
of other types) go to torch's function unchanged.

Measured on that machine and model: functionalization's 198 calls ran 8 analyses (0.9 s), the post-grad decomposition and lowering
none, and the first step took 40.0 s (Inductor's 41.7 s); without the cache, 560 analyses took 22 s. A key on
Triton's content hash (`JITFunction.cache_key`), with autotuners left uncached, was slower (lowering 10.0 s).

The liger backend installs it before its first compile, on the torch versions that have that function. torch
2.13 analyses reads as well, in a function with a richer result (`identify_accessed_tensors`); that, and any
other signature, is left alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch

log = logging.getLogger("liger_compile")

_EXPECTED_PARAMETERS = ["kernel", "kwargs", "tma_descriptor_metadata"]
_VALUE_TYPES = (bool, int, float, str, type(None), torch.dtype)
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def analysis_key(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any) -> tuple | None:
    """What torch's analysis of `kernel` reads from these arguments, or None when that cannot be keyed exactly."""
    import sympy
    from torch._inductor.ir import TensorBox
    from torch._subclasses.fake_tensor import FakeTensor

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if tma_descriptor_metadata:
        return None
    if isinstance(kernel, Autotuner) and isinstance(kernel.fn, JITFunction):
        # What torch's analysis reads of an autotuner: its JITFunction, and its first config's arguments with the
        # call's. torch makes one per launch passing num_warps=, so this is what lets launches share a result.
        first = kernel.configs[0].kwargs if kernel.configs else {}
        kernel, kwargs = kernel.fn, {**kwargs, **first}
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, (FakeTensor, TensorBox)):
            parts.append((name, "tensor", value.dtype))
        elif isinstance(value, (*_SYMBOLIC, sympy.Expr)):
            parts.append((name, "symbolic"))
        elif isinstance(value, _VALUE_TYPES):
            parts.append((name, type(value), value))  # the type too: Triton specializes True and 1 differently
        else:
            return None
    return id(kernel), tuple(parts)


def memoizing(analyze: Callable) -> Callable:
    """`analyze` (torch's `identify_mutated_tensors`) with its results cached per `analysis_key`."""
    results: dict[tuple, tuple[Any, tuple[str, ...]]] = {}  # the kernel is kept so that its id is not reused

    @functools.wraps(analyze)
    def identify_mutated_tensors(kernel, kwargs, tma_descriptor_metadata):
        key = analysis_key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analyze(kernel, kwargs, tma_descriptor_metadata)
        if key not in results:
            results[key] = kernel, tuple(analyze(kernel, kwargs, tma_descriptor_metadata))
        return list(results[key][1])

    identify_mutated_tensors.liger_results = results
    return identify_mutated_tensors


def memoize_mutation_analysis() -> bool:
    """Install the memoized analysis in torch (once per process); whether it is installed."""
    from torch._higher_order_ops import triton_kernel_wrap

    current = getattr(triton_kernel_wrap, "identify_mutated_tensors", None)
    if hasattr(current, "liger_results"):
        return True
    if current is None or list(inspect.signature(current).parameters) != _EXPECTED_PARAMETERS:
        # torch 2.13 analyses reads too (`identify_accessed_tensors`, a richer result); that is not cached.
        log.debug("liger_compile: this torch has no identify_mutated_tensors(%s); its analysis is not cached",
                  ", ".join(_EXPECTED_PARAMETERS))
        return False
    # Inductor's lowering and the functionalization rule both look the function up in this module when called.
    triton_kernel_wrap.identify_mutated_tensors = memoizing(current)
    return True
