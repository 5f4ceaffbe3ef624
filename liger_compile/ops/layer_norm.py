"""LayerNorm as torch.library custom ops.

``torch.ops.liger.layer_norm(x, weight, bias, eps=1e-5)`` normalises over the last dim exactly as
``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`` does: mean and biased variance in fp32,
``y = ((x - mean) * rsqrt(var + eps) * weight + bias).to(x.dtype)``, rounded once. Weight and bias are
optional and may have another float dtype than ``x`` (their values are used in fp32; gradients come back in
their own dtypes). Backward needs only x and the fp32 mean and rstd the forward op returns.
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

_OP = "layer_norm"


def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    check_float_tensor(_OP, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        fail(_OP, f"x must have a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    check_eps(_OP, eps)
    check_same_device(_OP, x=x, weight=weight, bias=bias)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        check_float_tensor(_OP, name, tensor)
        if tensor.dim() != 1 or tensor.shape[0] != x.shape[-1]:
            fail(_OP, f"{name} must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(tensor.shape)}")


def _check_backward_inputs(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    if dy.shape != x.shape or mean.shape != x.shape[:-1] or rstd.shape != x.shape[:-1]:
        fail(f"{_OP}_backward", f"dy {tuple(dy.shape)}, mean {tuple(mean.shape)} and rstd {tuple(rstd.shape)} "
                                f"must match x {tuple(x.shape)}")


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch definition of the op: (y, mean, rstd) with mean and rstd in fp32 of shape x.shape[:-1]."""
    x_float = x.float()
    mean = x_float.mean(-1, keepdim=True)
    centered = x_float - mean
    rstd = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous(), mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradient formula the kernel implements, in fp32: (dx, dW or None, dB in fp32 or None)."""
    rstd = rstd.unsqueeze(-1)
    xhat = (x.float() - mean.unsqueeze(-1)) * rstd
    dy = dy.float()
    dxhat = dy if weight is None else dy * weight.float()
    dx = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
    rows = x.shape[-1]
    dw = (dy * xhat).reshape(-1, rows).sum(0).to(weight.dtype) if compute_dw and weight is not None else None
    db = dy.reshape(-1, rows).sum(0) if compute_db else None
    return dx.to(x.dtype), dw, db


@define_op("layer_norm_forward")
def _layer_norm_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(x, weight, bias, eps)
    if not can_launch(x):
        return layer_norm_reference(x, weight, bias, eps)
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    # outputs allocated in x's shape, not views of 2-D ones: autograd forbids in-place ops on views returned
    # by a multi-output function, and models do write into a norm's output
    return kernels.layer_norm_forward(as_rows(x), w, b, eps, shape=x.shape)


@define_op("layer_norm_backward")
def _layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
    dh: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, dB in fp32); dW and dB are empty tensors when not computed (custom ops cannot return None).
    With `dh` (the gradient of h = x + residual from its other uses), dx + dh."""
    _check_backward_inputs(dy, x, mean, rstd)
    if can_launch(x):
        w = None if weight is None else weight.contiguous()
        dx, dw, db = kernels.layer_norm_backward(as_rows(dy), as_rows(x), w, mean.contiguous().view(-1),
                                                 rstd.contiguous().view(-1), compute_dw, compute_db,
                                                 dh=None if dh is None else as_rows(dh), shape=x.shape)
    else:
        dx, dw, db = layer_norm_backward_reference(dy, x, weight, mean, rstd, compute_dw, compute_db)
        dx = (dx if dh is None else dx + dh).contiguous()
    def or_empty(grad):  # a fresh empty each: outputs of a custom op may not alias one another
        return x.new_empty((0,), dtype=torch.float32) if grad is None else grad

    return dx, or_empty(dw), or_empty(db)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.liger.layer_norm_backward(dy, x, weight, mean, rstd, compute_dw, compute_db)
    return dx, (dw if compute_dw else None), (db.to(ctx.bias_dtype) if compute_db else None), None


_layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)

torch.library.define("liger::layer_norm", "(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05) -> Tensor")


@torch.library.impl("liger::layer_norm", "CompositeImplicitAutograd")
def _layer_norm(x, weight, bias, eps=1e-5):
    return torch.ops.liger.layer_norm_forward(x, weight, bias, eps)[0]


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim of `x`, as ``F.layer_norm``; differentiable in x, weight and bias."""
    return torch.ops.liger.layer_norm(x, weight, bias, eps)


# --- h = x + residual, then LayerNorm of h: one pass over both operands ------------------------------------

@define_op("add_layer_norm_forward")
def _add_layer_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd): h = x + residual in x's dtype, y = layer_norm(h)."""
    _check_inputs(x, weight, bias, eps)
    check_residual("add_layer_norm", x, residual)
    if not can_launch(x):
        h = x + residual
        y, mean, rstd = layer_norm_reference(h, weight, bias, eps)
        return y, h, mean, rstd
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return kernels.add_norm_forward(as_rows(x), as_rows(residual), w, b, eps, centered=True, shape=x.shape)


def _add_setup_context(ctx, inputs, output):
    _x, _residual, weight, bias, _eps = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)  # what layer_norm(h) saves: x and residual are not needed
    ctx.bias_dtype = None if bias is None else bias.dtype


def _add_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    dsum, dw, db = torch.ops.liger.layer_norm_backward(dy, h, weight, mean, rstd, compute_dw, compute_db, dh)
    return dsum, dsum, (dw if compute_dw else None), (db.to(ctx.bias_dtype) if compute_db else None), None


_add_layer_norm_forward.register_autograd(_add_backward, setup_context=_add_setup_context)

torch.library.define(
    "liger::add_layer_norm",
    "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps=1e-05) -> (Tensor, Tensor)",
)


@torch.library.impl("liger::add_layer_norm", "CompositeImplicitAutograd")
def _add_layer_norm(x, residual, weight, bias, eps=1e-5):
    y, h, _, _ = torch.ops.liger.add_layer_norm_forward(x, residual, weight, bias, eps)
    return y, h


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(h), h) for h = x + residual, reading x and the residual once; differentiable in all."""
    return torch.ops.liger.add_layer_norm(x, residual, weight, bias, eps)
