"""Cross-entropy over (N, V) logits as torch.library custom ops.

``torch.ops.liger.cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
label_smoothing=0.0, lse_square_scale=0.0, softcap=None)`` is ``F.cross_entropy`` with the same arguments, plus

- z-loss: ``lse_square_scale * logsumexp(x)**2`` per row not ignored, reduced like the loss (``mean`` divides by
  the number of rows not ignored) and added to it; ``cross_entropy_forward`` also returns it alone, for logging;
- final-logit softcapping: ``x = softcap * tanh(logits / softcap)`` first, rounded step by step in the logits'
  dtype as Gemma 2 and 3 compute it.

The math is fp32 whatever the logits' dtype and the loss is fp32 (cast it to match ``F.cross_entropy`` on
bf16 logits, which rounds its log-probabilities to bf16). ``dlogits`` has the logits' dtype and is the only
(N, V) tensor backward allocates; forward saves only the per-row logsumexp next to the logits it read.

A label outside [0, V) that is not ``ignore_index`` raises `LigerOpError` when the op runs eagerly; under
torch.compile (where checking would sync the device) it makes the loss NaN instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from liger_compile.kernels import cross_entropy as kernels
from liger_compile.kernels._launch import can_launch, is_traced
from liger_compile.ops._library import check_float_tensor, check_same_device, define_op, fail

REDUCTIONS = ("mean", "sum", "none")
_OP = "cross_entropy"


def check_options(op: str, reduction: str, label_smoothing: float, lse_square_scale: float,
                  softcap: float | None) -> None:
    if reduction not in REDUCTIONS:
        fail(op, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        fail(op, f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0):
        fail(op, f"lse_square_scale must be a finite number >= 0, got {lse_square_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        fail(op, f"softcap must be a finite number > 0 (or None), got {softcap}")


def check_target(op: str, target: torch.Tensor, n_rows: int, n_classes: int,
                 class_weight: torch.Tensor | None) -> None:
    """Shape and dtype of the labels and class weights."""
    if target.dtype not in (torch.int64, torch.int32):
        fail(op, f"target must hold class indices as int64 or int32, got {target.dtype} "
                 "(class probabilities are not supported)")
    if target.shape != (n_rows,):
        fail(op, f"target must have shape ({n_rows},), one label per row, got {tuple(target.shape)}")
    if class_weight is not None:
        check_float_tensor(op, "weight", class_weight)
        if class_weight.shape != (n_classes,):
            fail(op, f"weight must have shape ({n_classes},), one per class, got {tuple(class_weight.shape)}")


def check_label_values(op: str, target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Labels in [0, n_classes) or ignore_index. Reading them syncs the device, so only the Python functions
    and modules check (the ops, and compiled graphs, give a NaN loss row instead), and not while a CUDA graph
    is being captured."""
    if is_traced(target) or (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    out_of_range = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if out_of_range.any():
        bad = target[out_of_range][:5].tolist()
        fail(op, f"labels must be in [0, {n_classes}) or ignore_index={ignore_index}, got {bad}")


def _check_inputs(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap):
    check_float_tensor(_OP, "logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        fail(_OP, f"logits must be 2-D (rows, classes) with at least one class, got shape {tuple(logits.shape)}")
    check_same_device(_OP, logits=logits, target=target, weight=weight)
    check_options(_OP, reduction, label_smoothing, lse_square_scale, softcap)
    check_target(_OP, target, logits.shape[0], logits.shape[1], weight)


def denominators(target: torch.Tensor, class_weight: torch.Tensor | None,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``mean`` divides by: (sum of the labels' class weights, number of rows not ignored), fp32, 0-d."""
    valid = target != ignore_index
    count = valid.sum().float()
    if class_weight is None:
        return count, count
    safe = torch.where(valid, target, 0).clamp(0, class_weight.shape[0] - 1)
    return (class_weight.float().gather(0, safe) * valid).sum(), count


def reduce_rows(rows: torch.Tensor, reduction: str, denominator: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / denominator if reduction == "mean" else total


def row_scales(dloss: torch.Tensor, n_rows: int, reduction: str, target: torch.Tensor,
               class_weight: torch.Tensor | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h): each row's factor on the gradient of its loss and of its z-loss, fp32 of shape (n_rows,)."""
    dloss = dloss.float()
    if reduction == "none":
        return dloss, dloss
    if reduction == "sum":
        return dloss.expand(n_rows), dloss.expand(n_rows)
    weight_total, count = denominators(target, class_weight, ignore_index)
    return (dloss / weight_total).expand(n_rows), (dloss / count).expand(n_rows)


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)`` as eager computes it, in the logits' dtype."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _reference_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, softcap):
    """(``F.cross_entropy`` of the softcapped fp32 logits with `reduction`, per-row logsumexp, 0 where ignored)."""
    x = softcapped(logits, softcap).float()
    loss = F.cross_entropy(x, target.long(), weight=None if weight is None else weight.float(),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss, torch.where(target != ignore_index, torch.logsumexp(x, -1), 0.0)


def cross_entropy_reference(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                            softcap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch definition: (loss including z-loss, z-loss, per-row logsumexp), fp32."""
    ce, lse = _reference_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, softcap)
    z = reduce_rows(lse_square_scale * lse * lse, reduction, denominators(target, weight, ignore_index)[1])
    return ce + z, z, lse


def cross_entropy_backward_reference(g, h, logits, target, weight, lse, ignore_index, label_smoothing,
                                     lse_square_scale, softcap) -> torch.Tensor:
    """The kernel's gradient formula (see `liger_compile.kernels.cross_entropy`) in PyTorch."""
    n_classes = logits.shape[1]
    valid = target != ignore_index
    x = softcapped(logits, softcap).float()
    class_weight = torch.ones(n_classes, device=x.device) if weight is None else weight.float()
    safe_target = torch.where(valid, target, 0).long()
    target_weight = class_weight.gather(0, safe_target)
    smoothing = label_smoothing / n_classes
    probability = torch.exp(x - lse[:, None])
    coefficient = g * (target_weight * (1 - label_smoothing) + smoothing * class_weight.sum())
    coefficient = coefficient + 2 * h * lse_square_scale * lse
    grad = probability * coefficient[:, None] - g[:, None] * smoothing * class_weight
    grad = grad - F.one_hot(safe_target, n_classes) * (
        g * target_weight * (1 - label_smoothing))[:, None]
    if softcap is not None:
        grad = grad * (1 - torch.tanh(logits / softcap).float() ** 2)
    return torch.where(valid[:, None], grad, 0.0).to(logits.dtype)


def _class_weight_and_sum(weight: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The class weights as the kernel reads them (contiguous fp32) and their sum (0-d, on the device)."""
    if weight is None:
        return None, None
    weight = weight.float().contiguous()
    return weight, weight.sum()


def _launch_options(ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float | None):
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_scale=lse_square_scale,
                softcap=softcap)


def _per_row_scale(scale: torch.Tensor) -> torch.Tensor:
    """A row scale as the kernel reads it: one value expanded (stride 0) stays as is, else contiguous."""
    return scale if scale.stride(0) == 0 else scale.contiguous()


def loss_rows(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
              label_smoothing: float, lse_square_scale: float, softcap: float | None,
              g: torch.Tensor | None = None, h: torch.Tensor | None = None):
    """Per row of (N, V) `logits`: (loss, z-loss, logsumexp), fp32 (N,), unreduced and 0 on ignored rows.

    Given the row scales g and h (see `row_scales`), also overwrite `logits`, which must be a temporary the
    caller owns, with the gradient of ``sum(g * loss + h * z)`` in the same pass.
    """
    if not can_launch(logits):
        rows, lse = _reference_cross_entropy(logits, target, weight, ignore_index, "none", label_smoothing, softcap)
        if g is not None:
            logits.copy_(cross_entropy_backward_reference(g, h, logits, target, weight, lse, ignore_index,
                                                          label_smoothing, lse_square_scale, softcap))
        return rows, lse_square_scale * lse * lse, lse
    rows, z, lse = (torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32) for _ in range(3))
    class_weight, class_weight_sum = _class_weight_and_sum(weight)
    with_grad = g is not None
    kernels.cross_entropy_rows(
        _unit_stride(logits), target.contiguous(), class_weight, class_weight_sum,
        mode="stats_and_grad" if with_grad else "stats", loss=rows, z=z, lse=lse,
        grad=logits if with_grad else None, g=_per_row_scale(g) if with_grad else None,
        h=_per_row_scale(h) if with_grad else None,
        **_launch_options(ignore_index, label_smoothing, lse_square_scale, softcap))
    return rows, z, lse


@define_op("cross_entropy_forward")
def _cross_entropy_forward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, lse_square_scale: float, softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, lse); loss includes z_loss; lse is fp32 (N,), 0 on ignored rows."""
    _check_inputs(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    rows, z_rows, lse = loss_rows(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap)
    weight_total, count = denominators(target, weight, ignore_index)
    z = reduce_rows(z_rows, reduction, count)
    return reduce_rows(rows, reduction, weight_total) + z, z, lse


@define_op("cross_entropy_backward")
def _cross_entropy_backward(
    dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    lse: torch.Tensor, ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float,
    softcap: Optional[float],
) -> torch.Tensor:
    """dlogits (the logits' dtype and shape) for the loss's cotangent `dloss`."""
    n_rows = logits.shape[0]
    expected = (n_rows,) if reduction == "none" else ()
    if dloss.shape != expected or lse.shape != (n_rows,):
        fail(f"{_OP}_backward", f"dloss {tuple(dloss.shape)} must have shape {expected} and lse "
                                f"{tuple(lse.shape)} shape ({n_rows},)")
    g, h = row_scales(dloss, n_rows, reduction, target, weight, ignore_index)
    if not can_launch(logits):
        return cross_entropy_backward_reference(g, h, logits, target, weight, lse, ignore_index, label_smoothing,
                                                lse_square_scale, softcap)
    logits = _unit_stride(logits)
    grad = torch.empty_like(logits)
    class_weight, class_weight_sum = _class_weight_and_sum(weight)
    kernels.cross_entropy_rows(
        logits, target.contiguous(), class_weight, class_weight_sum, mode="grad", lse=lse.contiguous(),
        grad=grad, g=_per_row_scale(g), h=_per_row_scale(h),
        **_launch_options(ignore_index, label_smoothing, lse_square_scale, softcap))
    return grad


def _unit_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap = inputs
    ctx.save_for_backward(logits, target, weight, output[2])
    ctx.options = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dloss, _dz, _dlse):
    logits, target, weight, lse = ctx.saved_tensors
    ignore_index, reduction, label_smoothing, lse_square_scale, softcap = ctx.options
    if weight is not None and ctx.needs_input_grad[2]:
        fail(_OP, "class weights that require grad are not supported")
    dlogits = torch.ops.liger.cross_entropy_backward(dloss, logits, target, weight, lse, ignore_index, reduction,
                                                     label_smoothing, lse_square_scale, softcap)
    return dlogits, None, None, None, None, None, None, None


_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)

torch.library.define(
    "liger::cross_entropy",
    "(Tensor logits, Tensor target, Tensor? weight=None, int ignore_index=-100, str reduction='mean', "
    "float label_smoothing=0., float lse_square_scale=0., float? softcap=None) -> Tensor",
)


@torch.library.impl("liger::cross_entropy", "CompositeImplicitAutograd")
def _cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   lse_square_scale=0.0, softcap=None):
    return torch.ops.liger.cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing,
                                                 lse_square_scale, softcap)[0]


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy`` on (N, V) logits, computed in fp32 (the loss is fp32); differentiable in `logits`.

    With `return_z_loss`, also the z-loss included in the loss (not differentiable: for logging). Labels out of
    range raise `LigerOpError` (a device sync; the op itself gives a NaN loss row).
    """
    check_label_values(_OP, target, logits.shape[-1], ignore_index)
    loss, z_loss, _lse = torch.ops.liger.cross_entropy_forward(
        logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    return (loss, z_loss) if return_z_loss else loss
