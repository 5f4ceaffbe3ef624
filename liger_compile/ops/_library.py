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
