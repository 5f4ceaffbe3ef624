"""RMSNorm as torch.library custom ops.

``torch.ops.liger.rms_norm(x, weight, eps, offset=0.0, casting_mode="llama")`` normalises over the last dim:
``rstd = rsqrt(mean(x**2, -1) + eps)``, then scales by ``offset + weight`` (if a weight is given) with the
rounding of one of three casting modes (see `liger_compile.kernels.norm`):

=========  ========================================================  ==============================
mode       computation                                                output dtype
=========  ========================================================  ==============================
``llama``  ``(x.float() * rstd).to(x.dtype) * (offset + weight)``     ``promote(x.dtype, w.dtype)``
``gemma``  ``(x.float() * rstd * (offset + weight)).to(x.dtype)``     ``x.dtype``
``none``   all arithmetic in ``x.dtype`` (weight must share it)       ``x.dtype``
=========  ========================================================  ==============================
"""

from __future__ import annotations

from typing import Optional

import torch

from liger_compile.kernels import norm as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import (
    as_rows,
    check_eps,
    check_float_tensor,
    check_residual,
    check_same_device,
    define_op,
    fail,
)

CASTING_MODES = kernels.CASTING_MODES
_OP = "rms_norm"


def output_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype | None, casting_mode: str) -> torch.dtype:
    if casting_mode == "llama" and weight_dtype is not None:
        return torch.promote_types(x_dtype, weight_dtype)
    return x_dtype


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting_mode: str):
    check_float_tensor(_OP, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        fail(_OP, f"x must have a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    if casting_mode not in CASTING_MODES:
        fail(_OP, f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    check_eps(_OP, eps)
    if weight is None:
        if offset != 0.0:
            fail(_OP, f"offset={offset} needs a weight to be added to")
        return
    check_float_tensor(_OP, "weight", weight)
    check_same_device(_OP, x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        fail(_OP, f"weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if casting_mode == "none" and weight.dtype != x.dtype:
        fail(_OP, f"casting_mode 'none' computes in x's dtype {x.dtype}, but weight is {weight.dtype}")


def _check_backward_inputs(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor):
    if dy.shape != x.shape or rstd.shape != x.shape[:-1]:
        fail(f"{_OP}_backward", f"dy {tuple(dy.shape)} and rstd {tuple(rstd.shape)} must match x {tuple(x.shape)}")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0, casting_mode: str = "llama"
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of the op: (y, rstd) with rstd in fp32 of shape x.shape[:-1]."""
    if casting_mode == "none":
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normalized = x * rstd
    else:
        x_float = x.float()
        rstd = torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
        normalized = x_float * rstd
        if casting_mode == "llama":
            normalized = normalized.to(x.dtype)
    y = normalized if weight is None else normalized * (weight + offset)
    if casting_mode != "llama":
        y = y.to(x.dtype)
    return y.contiguous(), rstd.squeeze(-1).float()


def rms_norm_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient formula the kernel implements, in fp32: (dx, dW or None)."""
    rstd = rstd.unsqueeze(-1)
    xhat = x.float() * rstd
    dy = dy.float()
    dxhat = dy if weight is None else dy * (weight + offset).float()
    dx = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
    if not compute_dw or weight is None:
        return dx.to(x.dtype), None
    multiplied = xhat if casting_mode == "gemma" else xhat.to(x.dtype).float()
    dw = (dy * multiplied).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


@define_op("rms_norm_forward")
def _rms_norm_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, casting_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, weight, eps, offset, casting_mode)
    if not can_launch(x):
        return rms_norm_reference(x, weight, eps, offset, casting_mode)
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, casting_mode)
    w = None if weight is None else weight.contiguous()
    # outputs allocated in x's shape, not views of 2-D ones: autograd forbids in-place ops on views returned
    # by a multi-output function, and models do write into a norm's output
    return kernels.rms_norm_forward(as_rows(x), w, eps, offset, casting_mode, out_dtype, shape=x.shape)


@define_op("rms_norm_backward")
def _rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
    dh: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW); dW is an empty tensor when `compute_dw` is False (custom ops cannot return None). With `dh`
    (the gradient of h = x + residual from its other uses), dx + dh: the gradient of both operands."""
    _check_backward_inputs(dy, x, rstd)
    if can_launch(x):
        w = None if weight is None else weight.contiguous()
        dx, dw = kernels.rms_norm_backward(as_rows(dy), as_rows(x), w, rstd.contiguous().view(-1), offset,
                                           casting_mode, compute_dw, dh=None if dh is None else as_rows(dh),
                                           shape=x.shape)
    else:
        dx, dw = rms_norm_backward_reference(dy, x, weight, rstd, offset, casting_mode, compute_dw)
        dx = (dx if dh is None else dx + dh).contiguous()
    return dx, (dw if dw is not None else x.new_empty((0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, _eps, offset, casting_mode = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset
    ctx.casting_mode = casting_mode


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.liger.rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.casting_mode, compute_dw)
    return dx, (dw if compute_dw else None), None, None, None


_rms_norm_forward.register_autograd(_backward, setup_context=_setup_context)

torch.library.define(
    "liger::rms_norm",
    "(Tensor x, Tensor? weight, float eps, float offset=0., str casting_mode='llama') -> Tensor",
)


@torch.library.impl("liger::rms_norm", "CompositeImplicitAutograd")
def _rms_norm(x, weight, eps, offset=0.0, casting_mode="llama"):
    return torch.ops.liger.rms_norm_forward(x, weight, eps, offset, casting_mode)[0]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """RMSNorm over the last dim of `x`; differentiable in `x` and `weight`. See the module docstring."""
    return torch.ops.liger.rms_norm(x, weight, eps, offset, casting_mode)


# --- h = x + residual, then RMSNorm of h: one pass over both operands ------------------------------------------

@define_op("add_rms_norm_forward")
def _add_rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
    casting_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): h = x + residual in x's dtype, y = rms_norm(h)."""
    _check_inputs(x, weight, eps, offset, casting_mode)
    check_residual("add_rms_norm", x, residual)
    if not can_launch(x):
        h = x + residual
        y, rstd = rms_norm_reference(h, weight, eps, offset, casting_mode)
        return y, h, rstd
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, casting_mode)
    w = None if weight is None else weight.contiguous()
    y, h, _, rstd = kernels.add_norm_forward(as_rows(x), as_rows(residual), w, None, eps, centered=False,
                                             offset=offset, casting_mode=casting_mode, out_dtype=out_dtype,
                                             shape=x.shape)
    return y, h, rstd


def _add_setup_context(ctx, inputs, output):
    _x, _residual, weight, _eps, offset, casting_mode = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)  # what rms_norm(h) saves: x and residual are not needed
    ctx.offset = offset
    ctx.casting_mode = casting_mode


def _add_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    dsum, dw = torch.ops.liger.rms_norm_backward(dy, h, weight, rstd, ctx.offset, ctx.casting_mode, compute_dw, dh)
    return dsum, dsum, (dw if compute_dw else None), None, None, None


_add_rms_norm_forward.register_autograd(_add_backward, setup_context=_add_setup_context)

torch.library.define(
    "liger::add_rms_norm",
    "(Tensor x, Tensor residual, Tensor? weight, float eps, float offset=0., str casting_mode='llama') "
    "-> (Tensor, Tensor)",
)


@torch.library.impl("liger::add_rms_norm", "CompositeImplicitAutograd")
def _add_rms_norm(x, residual, weight, eps, offset=0.0, casting_mode="llama"):
    y, h, _ = torch.ops.liger.add_rms_norm_forward(x, residual, weight, eps, offset, casting_mode)
    return y, h


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) for h = x + residual, reading x and the residual once (a pre-norm block's residual
    stream and its next norm); differentiable in x, residual and weight."""
    return torch.ops.liger.add_rms_norm(x, residual, weight, eps, offset, casting_mode)
