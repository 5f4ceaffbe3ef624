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

import torch

from liger_compile.kernels._launch import can_launch, is_traced
from liger_compile.kernels.scale import scale_

NAMESPACE = "liger"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LigerOpError(ValueError):
    """Input a liger op cannot compute exactly; the message starts with the op's qualified name."""


def fail(op: str, message: str) -> None:
    raise LigerOpError(f"{NAMESPACE}::{op}: {message}")


def check_float_tensor(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        fail(op, f"all tensors must be on one device, got {listing}")


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
