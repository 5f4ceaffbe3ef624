"""Linear layer + cross-entropy in row chunks, so that the (N, V) logits never exist at once.

``torch.ops.liger.fused_linear_cross_entropy(hidden, weight, bias, target, class_weight=None, ignore_index=-100,
reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None, chunk_rows=0)`` computes
``liger::cross_entropy(hidden @ weight.T + bias, target, ...)`` (see `liger_compile.ops.cross_entropy` for the
options) with hidden (N, H), weight (V, H) and bias (V,) or None, all of one dtype. The logits are computed in
that dtype, as ``F.linear`` computes them.

For each chunk of `chunk_rows` rows: one GEMM gives the chunk's logits, one kernel pass gives its loss and
overwrites the logits with their gradient, and two more GEMMs give the chunk's part of the hidden and weight
gradients. Memory is one chunk of logits; time is the three GEMMs of the unfused computation plus the weight
gradient's read-modify-write once per chunk after the first, summed in the weight's dtype. `chunk_rows` is the
knob between the two: 0 chooses the chunk from V and the dtype (`AUTO_CHUNK_BYTES` of logits), the same on
every call so that results do not depend on free memory.

With ``reduction="mean"`` or ``"sum"`` the gradients are computed in forward, when the loss's cotangent is not yet
known, for a cotangent of 1, and backward scales them. With ``"none"`` each row's cotangent is needed, so
backward computes the logits again (a fourth GEMM). Without grad mode, or with no input requiring grad, forward
computes only the loss (one GEMM).
"""

from __future__ import annotations

from typing import Optional

import torch

from liger_compile.ops._library import (
    add_linear_gradients,
    check_float_tensor,
    check_same_device,
    chunk_rows_for,
    define_op,
    fail,
    gradient_needs,
    gradient_placeholder,
    keep_gradients,
    register_autocast,
    scale_precomputed,
)
from liger_compile.ops.cross_entropy import (
    check_label_values,
    check_options,
    check_target,
    denominators,
    loss_rows,
    reduce_rows,
    row_scales,
)

_OP = "fused_linear_cross_entropy"


def _check_inputs(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap):
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_float_tensor(_OP, name, tensor)
    check_same_device(_OP, hidden=hidden, weight=weight, bias=bias, target=target, class_weight=class_weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        fail(_OP, f"hidden must be (N, H) and weight (V, H) with V >= 1, got {tuple(hidden.shape)} and "
                  f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        fail(_OP, f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) > 1:
        fail(_OP, f"hidden, weight and bias must have one dtype (as F.linear needs), got {sorted(map(str, dtypes))}")
    check_options(_OP, reduction, label_smoothing, lse_square_scale, softcap)
    check_target(_OP, target, hidden.shape[0], weight.shape[0], class_weight)


def _chunked(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, lse_square_scale,
             softcap, chunk_rows, scales, needs):
    """Loss and z-loss per row, and with row scales (g, h) the gradients `needs` asks for (hidden, weight,
    bias; empty tensors for the others)."""
    n_rows, n_classes = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows_for(_OP, n_rows, n_classes * hidden.dtype.itemsize, chunk_rows)
    rows = hidden.new_empty(n_rows, dtype=torch.float32)
    z_rows = torch.empty_like(rows)
    grad_hidden, grad_weight = gradient_placeholder(hidden, needs[0]), gradient_placeholder(weight, needs[1])
    grad_bias = torch.zeros(n_classes, device=hidden.device, dtype=torch.float32) if needs[2] else None
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        hidden_chunk = hidden[start:end]
        logits = hidden_chunk @ weight.t() if bias is None else torch.addmm(bias, hidden_chunk, weight.t())
        g, h = (None, None) if scales is None else (scales[0][start:end], scales[1][start:end])
        rows[start:end], z_rows[start:end], _lse = loss_rows(
            logits, target[start:end], class_weight, ignore_index, label_smoothing, lse_square_scale, softcap, g, h)
        if scales is None:
            continue
        dlogits = logits  # overwritten in place by loss_rows
        add_linear_gradients(dlogits, hidden_chunk, weight, start, grad_hidden if needs[0] else None,
                             grad_weight if needs[1] else None)
        if needs[2]:
            grad_bias += dlogits.sum(0, dtype=torch.float32)
        del logits, dlogits  # before the next chunk's logits are allocated: one chunk alive at a time
    grad_bias = grad_bias.to(hidden.dtype) if grad_bias is not None else hidden.new_empty(0)
    return rows, z_rows, grad_hidden, grad_weight, grad_bias


@define_op("fused_linear_cross_entropy_forward", traced=False)
def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    class_weight: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
    lse_square_scale: float, softcap: Optional[float], chunk_rows: int, grad_hidden: bool, grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, dhidden, dweight, dbias): the gradients of the loss for a cotangent of 1, computed here
    when asked for and the reduction is not "none" (empty tensors otherwise)."""
    _check_inputs(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap)
    needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
    scales = None
    if reduction != "none" and any(needs):
        scales = row_scales(torch.ones((), device=hidden.device), hidden.shape[0], reduction, target,
                            class_weight, ignore_index)
    else:
        needs = (False, False, False)
    rows, z_rows, *grads = _chunked(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                    lse_square_scale, softcap, chunk_rows, scales, needs)
    weight_total, count = denominators(target, class_weight, ignore_index)
    z = reduce_rows(z_rows, reduction, count)
    return (reduce_rows(rows, reduction, weight_total) + z, z, *grads)


@_forward.register_fake
def _forward_fake(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap, chunk_rows, grad_hidden, grad_weight, grad_bias):
    loss_shape = (hidden.shape[0],) if reduction == "none" else ()
    precomputed = reduction != "none"
    loss = hidden.new_empty(loss_shape, dtype=torch.float32)
    return (loss, torch.empty_like(loss),
            gradient_placeholder(hidden, grad_hidden and precomputed),
            gradient_placeholder(weight, grad_weight and precomputed),
            gradient_placeholder(bias, grad_bias and precomputed) if bias is not None else hidden.new_empty(0))


@define_op("fused_linear_cross_entropy_backward", traced=False)
def _backward_op(
    dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    target: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: Optional[float], chunk_rows: int, grad_hidden: bool, grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) for reduction "none" and per-row cotangents `dloss`, logits computed again."""
    if dloss.shape != (hidden.shape[0],):
        fail(f"{_OP}_backward", f"dloss must have shape ({hidden.shape[0]},), got {tuple(dloss.shape)}")
    scales = row_scales(dloss, hidden.shape[0], "none", target, class_weight, ignore_index)
    needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
    _rows, _z, *grads = _chunked(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                 lse_square_scale, softcap, chunk_rows, scales, needs)
    return tuple(grads)


@_backward_op.register_fake
def _backward_fake(dloss, hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                   lse_square_scale, softcap, chunk_rows, grad_hidden, grad_weight, grad_bias):
    return (gradient_placeholder(hidden, grad_hidden), gradient_placeholder(weight, grad_weight),
            gradient_placeholder(bias, grad_bias) if bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
     softcap, chunk_rows, *needs) = inputs
    ctx.mark_non_differentiable(*output[1:])
    # No zero cotangents for the outputs other than the loss: for the gradients, they would be weight-sized.
    ctx.set_materialize_grads(False)
    ctx.precomputed = reduction != "none"
    if ctx.precomputed:
        keep_gradients(ctx, output[2:])
    else:
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
        ctx.options = (ignore_index, label_smoothing, lse_square_scale, softcap, chunk_rows, *needs)


def _backward(ctx, dloss, *_unused):
    needs = ctx.needs_input_grad[:3]
    if dloss is None:  # the loss itself was not used
        return (None,) * 14
    if ctx.precomputed:
        grads = scale_precomputed(ctx, _OP, needs, dloss)
    else:
        hidden, weight, bias, target, class_weight = ctx.saved_tensors
        grads = torch.ops.liger.fused_linear_cross_entropy_backward(
            dloss, hidden, weight, bias, target, class_weight, *ctx.options)
        grads = [grad if need else None for grad, need in zip(grads, needs)]
    return (*grads, *[None] * 11)


_forward.register_autograd(_backward, setup_context=_setup_context)
# the lm_head in autocast's dtype, as F.linear computes it
register_autocast("liger::fused_linear_cross_entropy_forward", "lower")

torch.library.define(
    "liger::fused_linear_cross_entropy",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight=None, int ignore_index=-100, "
    "str reduction='mean', float label_smoothing=0., float lse_square_scale=0., float? softcap=None, "
    "int chunk_rows=0) -> Tensor",
)


def _forward_with_needs(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                        lse_square_scale, softcap, chunk_rows):
    """The forward op, told which gradients autograd will ask for (this runs above autograd, which knows)."""
    needs = gradient_needs(hidden, weight, bias)
    return torch.ops.liger.fused_linear_cross_entropy_forward(
        hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
        softcap, chunk_rows, *needs)


@torch.library.impl("liger::fused_linear_cross_entropy", "CompositeImplicitAutograd")
def _fused_linear_cross_entropy(hidden, weight, bias, target, class_weight=None, ignore_index=-100,
                                reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                                chunk_rows=0):
    return _forward_with_needs(hidden, weight, bias, target, class_weight, ignore_index, reduction,
                               label_smoothing, lse_square_scale, softcap, chunk_rows)[0]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_rows: int = 0,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits; differentiable in
    hidden, weight and bias. With `return_z_loss`, also the z-loss included in the loss (for logging). Labels out
    of range raise `LigerOpError` (a device sync; the op itself gives a NaN loss row)."""
    check_label_values(_OP, target, weight.shape[0], ignore_index)
    loss, z_loss, *_grads = _forward_with_needs(hidden, weight, bias, target, class_weight, ignore_index, reduction,
                                                label_smoothing, lse_square_scale, softcap, chunk_rows)
    return (loss, z_loss) if return_z_loss else loss
