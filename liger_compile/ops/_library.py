"""What every liger op shares: the namespace, input checks with errors that name the op, and dispatch.

Each op family is a set of functional `torch.library` custom ops in the ``liger`` namespace:

- a public op users call (``torch.ops.liger.<name>``), returning only what the math returns;
- where backward needs statistics (rstd, lse, ...), a ``<name>_forward`` op that returns them too, with the
  public op a CompositeImplicitAutograd wrapper over it (as ``aten::rms_norm`` wraps ``_fused_rms_norm``);
- a ``<name>_backward`` op called from the registered autograd formula, so that a compiled backward calls
  one opaque kernel instead of re-deriving it.

Real implementations run the Triton kernel where one can launch (CUDA, or the CPU under
``TRITON_INTERPRET=1``) and the PyTorch reference elsewhere; the reference is also the tests' oracle.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import typing

import torch
from triton.compiler.errors import TritonError

from liger_compile.kernels._launch import can_launch, is_traced, reference_only
from liger_compile.kernels.scale import scale_

NAMESPACE = "liger"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


STRICT_ENV = "LIGER_COMPILE_STRICT"

log = logging.getLogger("liger_compile")


def strict() -> bool:
    """``LIGER_COMPILE_STRICT=1``: what would fall back with a warning (a pass that raises, a kernel that does not
    compile) raises instead, for CI runs that must not pass on a fallback."""
    return os.environ.get(STRICT_ENV, "0") == "1"


class FallbackRefused(RuntimeError):
    """Strict mode's error in place of a fallback warning: raised once, where the fallback would have happened."""


def fall_back(message: str, error: BaseException | None = None) -> None:
    """Warn that something is skipped for a slower correct path, or raise `FallbackRefused` in strict mode."""
    if strict():
        raise FallbackRefused(f"liger_compile: {message} ({STRICT_ENV}=1)") from error
    log.warning("liger_compile: %s", message)


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0]


def define_op(name: str, *, traced: bool = True, mutates_args: tuple[str, ...] = ()):
    """Decorator defining op ``liger::<name>`` from its implementation: a `torch.library.triton_op`, whose kernel
    launches torch.compile traces into its graph, or with ``traced=False`` an opaque `torch.library.custom_op`.

    If a Triton kernel fails to compile (too little shared memory on a GPU, a compiler bug for a shape), the op
    warns and computes with its PyTorch reference, then and in every later call (a failed compile is retried on
    every launch, which costs more than the reference).
    """
    def decorate(impl):
        @functools.wraps(impl)
        def run(*args, **kwargs):
            if name not in _FAILED_KERNELS:
                try:
                    return impl(*args, **kwargs)
                except Exception as error:
                    if not from_triton(error):
                        raise
                    fall_back(f"a kernel of {NAMESPACE}::{name} failed to compile ({one_line(error)}); "
                              "computing it with the PyTorch reference from now on", error)
                    _FAILED_KERNELS.add(name)
            with reference_only():
                return impl(*args, **kwargs)

        # The schema is inferred from the signature, whose string annotations would be evaluated in this module.
        hints = typing.get_type_hints(impl)
        signature = inspect.signature(impl)
        run.__signature__ = signature.replace(
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
            return_annotation=hints.get("return", signature.return_annotation))
        define = torch.library.triton_op if traced else torch.library.custom_op
        return define(f"{NAMESPACE}::{name}", run, mutates_args=mutates_args)
    return decorate


_FAILED_KERNELS: set[str] = set()


def from_triton(error: BaseException | None) -> bool:
    """Whether `error`, or one it was raised from, is Triton's (compilation, resources, interpreter)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TritonError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class LigerOpError(ValueError):
    """Input a liger op cannot compute exactly; the message starts with the op's qualified name."""


def fail(op: str, message: str) -> None:
    raise LigerOpError(f"{NAMESPACE}::{op}: {message}")


def check_float_tensor(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_eps(op: str, eps: float) -> None:
    if isinstance(eps, torch.SymFloat):  # a float the compiled graph computes: reading it would specialize the graph
        return
    if not (math.isfinite(eps) and eps >= 0):
        fail(op, f"eps must be a finite number >= 0, got {eps}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        fail(op, f"all tensors must be on one device, got {listing}")


# --- Autocast ---------------------------------------------------------------------------------------------------

# Devices whose autocast the ops follow; autocast dispatches to a device's kernel only while it is enabled there.
AUTOCAST_DEVICES = ("cpu", "cuda")
AUTOCAST_POLICIES = ("keep", "lower", "fp32")


def register_autocast(qualname: str, policy: str) -> None:
    """How op `qualname` runs inside ``torch.autocast``; autocast is off inside it in every case, so that the
    PyTorch ops an implementation calls (matmuls of the fused linear losses, reference paths) compute in the
    dtypes the op chose, not autocast's:

    - ``"keep"``: inputs as they are (what the arithmetic a rewrite replaces does: elementwise ops are not cast);
    - ``"lower"`` (``F.linear``'s policy): floating inputs are cast to the autocast dtype, whichever it is;
    - ``"fp32"`` (``F.kl_div``'s policy, on both CPU and CUDA): 16-bit float inputs are cast to fp32.

    `torch.library.register_autocast` casts to one fixed dtype, which cannot follow the user's choice of fp16 or
    bf16. Like autocast, this casts only tensors on the autocast's device, and never float64 ones.
    """
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"autocast policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")
    op = getattr(torch.ops.liger, qualname.split("::")[-1]).default
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def autocast_kernel(*args, device_type=device_type, excluded=excluded):
            if policy != "keep":
                dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
                args = [_autocast_cast(arg, device_type, dtype) for arg in args]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*args)

        torch.library.impl(qualname, key, autocast_kernel)


def _autocast_cast(arg, device_type: str, dtype: torch.dtype):
    eligible = (isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype != torch.float64
                and arg.device.type == device_type)
    return arg.to(dtype) if eligible else arg


def keep_dtypes_under_autocast() -> None:
    """Register ``"keep"`` for every op with an implementation of its own (not a composite of other liger ops,
    which autocast passes through to them) that has no autocast policy yet. Run once all ops are defined."""
    for name in torch._C._dispatch_get_all_op_names():
        if (name.startswith(f"{NAMESPACE}::")
                and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
                and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU")):
            register_autocast(name, "keep")


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, last dim) view with unit stride along the last dim, copying only when no view exists."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def check_residual(op: str, x: torch.Tensor, residual: torch.Tensor) -> None:
    """The second operand of a fused ``x + residual``: same shape, dtype and device (no broadcast, no
    promotion: the sum is rounded to x's dtype as eager's add of two such tensors rounds it)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        fail(op, f"residual ({tuple(residual.shape)}, {residual.dtype}, {residual.device}) must match x "
                 f"({tuple(x.shape)}, {x.dtype}, {x.device})")


# --- Ops that compute their gradients in forward, chunk by chunk (the fused linear losses) ---------------------

# Logits a fused linear op computes at once when left to choose: the same on every call, so that results do not
# depend on free memory.
AUTO_CHUNK_BYTES = 1 << 30


def chunk_rows_for(op: str, n_rows: int, row_bytes: int, requested: int) -> int:
    """Rows per chunk: `requested`, or 0 for as many rows of `row_bytes` as `AUTO_CHUNK_BYTES` holds."""
    if requested < 0:
        fail(op, f"chunk_rows must be >= 0 (0: automatic), got {requested}")
    return max(1, min(n_rows, requested or AUTO_CHUNK_BYTES // row_bytes))


def add_linear_gradients(dlogits: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor, start: int,
                         grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """A row chunk's part of a linear layer's gradients, from its logits' gradient (rows start.. of the hidden
    states): its rows of the hidden gradient, ``dlogits @ weight``, and its term of the weight gradient,
    ``dlogits.T @ hidden_chunk``, which the chunk at row 0 writes and the later ones add, in the weight's dtype.
    A gradient given as None is not computed."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:start + dlogits.shape[0]])
    if grad_weight is None:
        return
    if start == 0:
        torch.mm(dlogits.t(), hidden_chunk, out=grad_weight)
    else:
        grad_weight.addmm_(dlogits.t(), hidden_chunk)


def gradient_needs(*tensors: torch.Tensor | None) -> list[bool]:
    """Which of `tensors` autograd will ask a gradient for: known above autograd, where the public op runs."""
    grad_mode = torch.is_grad_enabled()
    return [grad_mode and t is not None and t.requires_grad for t in tensors]


def gradient_placeholder(like: torch.Tensor, computed: bool) -> torch.Tensor:
    """What a forward op returns for a gradient, or its fake: `like`'s shape when computed, else an empty tensor
    (an op output cannot be None)."""
    return torch.empty_like(like) if computed else like.new_empty(0)


def keep_gradients(ctx, grads) -> None:
    """Keep the gradients forward computed (outputs of the op) for backward. Not with save_for_backward: backward
    hands them over to autograd, which then takes a gradient nobody else holds as the leaf's .grad instead of
    copying it. They are not differentiable, and get no zero cotangents (they are input- or weight-sized)."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.gradients = list(grads)


def scale_precomputed(ctx, op: str, needs, dloss: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients forward computed for a cotangent of 1 (see `keep_gradients`), times the loss's cotangent.

    Eagerly, scaled in place: the gradients belong to this node alone, and a copy of a weight's would cost as much
    memory as the weight. Traced, out of place (functional), and Inductor then reuses the buffer.
    """
    grads, ctx.gradients = getattr(ctx, "gradients", None), None
    if grads is None:
        fail(op, "backward ran twice through one loss (retain_graph=True); the gradients computed in forward are "
                 "handed over by the first")
    if any(need and grad.shape == (0,) for grad, need in zip(grads, needs)):  # forward's "not computed"
        fail(op, "backward needs a gradient that forward was told not to compute: call the public op, which "
                 "tells its forward op which inputs require grad")
    grads = [grad if need else None for grad, need in zip(grads, needs)]
    wanted = [grad for grad in grads if grad is not None]
    if any(is_traced(grad) for grad in wanted):
        return [None if grad is None else grad * dloss for grad in grads]
    for grad in wanted:
        if can_launch(grad) and grad.is_contiguous():
            scale_(grad, dloss)
        else:
            grad.mul_(dloss)
    return grads
