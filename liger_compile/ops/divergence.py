"""KL divergence and the generalized Jensen-Shannon divergence of distillation, as torch.library custom ops.

- ``torch.ops.liger.kl_div(input, target, reduction="mean", log_target=False)`` is ``F.kl_div`` with the same
  arguments (input and target of one shape; no broadcasting): every reduction, and the result in the dtype
  ``F.kl_div`` returns, computed in fp32 and rounded once.
- ``torch.ops.liger.jsd(student_logp, teacher_logp, labels=None, beta=0.5, ignore_index=-100,
  reduction="batchmean")``: with P the teacher's and Q the student's distribution over the last dim and
  M = beta P + (1 - beta) Q, each row's ``beta KL(P || M) + (1 - beta) KL(Q || M)``; beta = 0 is the forward
  KL(P || Q), beta = 1 the reverse KL(Q || P). Rows whose label is `ignore_index` count for nothing.
  ``batchmean`` divides the sum over rows by the number of rows counted, ``mean`` by that times the vocabulary,
  ``sum`` by nothing. The loss is fp32. Temperature is the caller's: these are log-probabilities.

Both are differentiable in both inputs, and make one pass over the inputs forward and one backward:

- the KL's forward reads both inputs for the loss; its backward writes the gradients asked for, reading only
  the target where the input's gradient is all that is asked (it is -target, or -exp(target)), and takes the
  loss's cotangent as it comes (elementwise for ``reduction="none"``);
- the JSD's forward reads both inputs once and writes the loss and the gradients autograd will ask for, for a
  cotangent of 1 (the mixture's logarithm is the costly part: computed once); backward scales them by the
  loss's cotangent, in place eagerly, and under torch.compile as a multiply Inductor fuses into what reads the
  gradient (the log_softmax's backward).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from liger_compile.kernels import divergence as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import (
    as_rows,
    check_float_tensor,
    check_same_device,
    define_op,
    fail,
    gradient_needs,
    gradient_placeholder,
    keep_gradients,
    register_autocast,
    scale_precomputed,
)

KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")
JSD_REDUCTIONS = ("batchmean", "mean", "sum")
_KL = "kl_div"
_JSD = "jsd"


def check_log_probability_pair(op: str, names: tuple[str, str], x: torch.Tensor, y: torch.Tensor) -> None:
    check_float_tensor(op, names[0], x)
    check_float_tensor(op, names[1], y)
    check_same_device(op, **{names[0]: x, names[1]: y})
    if x.shape != y.shape or x.dim() == 0:
        fail(op, f"{names[0]} {tuple(x.shape)} and {names[1]} {tuple(y.shape)} must have one shape with at least "
                 "one dim (broadcasting is not supported)")


def check_labels(op: str, labels: torch.Tensor | None, n_rows: int) -> None:
    if labels is None:
        return
    if labels.dtype not in (torch.int64, torch.int32) or labels.numel() != n_rows:
        fail(op, f"labels must hold one int64 or int32 label per row ({n_rows}), got {labels.dtype} of shape "
                 f"{tuple(labels.shape)}")


def check_beta(op: str, beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        fail(op, f"beta must be in [0, 1], got {beta}")


def jsd_form(beta: float) -> tuple[str, bool]:
    """(the kernel's form for this beta, whether the student is its x side): the JSD's ends are plain KLs."""
    if beta == 0.0:
        return "kl_log_target", True  # KL(P || Q) = sum P (log P - log Q): x = the student
    if beta == 1.0:
        return "kl_log_target", False  # KL(Q || P): x = the teacher
    return "mixture", True


def reference_elements(x: torch.Tensor, y: torch.Tensor, form: str, beta: float) -> torch.Tensor:
    """The divergence per element in PyTorch, in the inputs' dtype: the definition the kernels compute."""
    if form == "kl_log_target":
        return F.kl_div(x, y, reduction="none", log_target=True)
    if form == "kl_prob_target":
        return F.kl_div(x, y, reduction="none", log_target=False)
    mixture = _log_mixture(x, y, beta)
    return (beta * F.kl_div(mixture, y, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(mixture, x, reduction="none", log_target=True))


def _log_mixture(x: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta e^y + (1 - beta) e^x), finite where both exps underflow."""
    return torch.logaddexp(y + math.log(beta), x + math.log1p(-beta))


def loss_elements(x: torch.Tensor, y: torch.Tensor, form: str, dtype: torch.dtype) -> torch.Tensor:
    """The divergence per element of x and y (any one shape), in `dtype`."""
    if not can_launch(x):
        return reference_elements(x.float(), y.float(), form, 0.0).to(dtype)
    elements = torch.empty(x.shape, device=x.device, dtype=dtype)
    kernels.divergence_rows(as_rows(x), as_rows(y), form=form, elements=elements.view(-1, x.shape[-1]))
    return elements


def divergence(x: torch.Tensor, y: torch.Tensor, form: str, *, beta: float = 0.0,
               labels: torch.Tensor | None = None, ignore_index: int = -100, with_rows: bool = False,
               need_x: bool = False, need_y: bool = False, row_scale: torch.Tensor | None = None,
               cotangent: torch.Tensor | None = None):
    """For x and y of one shape, rows along the last dim, in one pass: (each row's divergence if `with_rows`,
    fp32 (N,); dx; dy), None for what is not asked for. The gradients are those of ``sum(row_scale * rows)``
    (one scale per row, fp32 (N,), stride 0 for one value) or of ``sum(cotangent * elements)``, in x's and y's
    dtypes. Rows whose label is `ignore_index` get 0 everywhere."""
    if not can_launch(x):
        rows = None
        if with_rows:
            rows = reference_elements(x.float(), y.float(), form, beta).sum(-1).reshape(-1)
            rows = rows if labels is None else torch.where(labels.reshape(-1) == ignore_index, 0.0, rows)
        weights, per_element = (cotangent, True) if cotangent is not None else (row_scale, False)
        grads = (None, None)
        if need_x or need_y:
            grads = _reference_gradients(x, y, form, beta, labels, ignore_index, weights, per_element, need_x, need_y)
        return rows, *grads
    rows = torch.empty(x.numel() // x.shape[-1], device=x.device, dtype=torch.float32) if with_rows else None
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_x else None
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if need_y else None
    if row_scale is not None and row_scale.stride(0) != 0:
        row_scale = row_scale.contiguous()
    tensors = [as_rows(t) if t is not None else None for t in (x, y, cotangent, dx, dy)]
    if not with_rows and labels is None and (row_scale is None or row_scale.stride(0) == 0):
        # Nothing differs between rows: one long row streams as a flat elementwise pass.
        tensors = [t.reshape(1, -1) if t is not None else None for t in tensors]
        row_scale = None if row_scale is None else row_scale[:1]
    x_rows, y_rows, cotangent_rows, dx_rows, dy_rows = tensors
    kernels.divergence_rows(
        x_rows, y_rows, form=form, beta=beta, labels=None if labels is None else labels.reshape(-1).contiguous(),
        ignore_index=ignore_index, row_loss=rows, scale=row_scale, cotangent=cotangent_rows, dx=dx_rows, dy=dy_rows)
    return rows, dx, dy


def reference_derivatives(x: torch.Tensor, y: torch.Tensor, form: str, beta: float):
    """d(element)/dx and d(element)/dy of `reference_elements` per element, as autograd gives them."""
    if form == "kl_log_target":
        p = y.exp()
        return -p, p * (y - x) + p
    if form == "kl_prob_target":
        return -y, torch.where(y == 0, 0.0, y.log()) + y / y - x
    p, q = y.exp(), x.exp()
    log_m = _log_mixture(x, y, beta)
    return (1 - beta) * q * (x - log_m), beta * p * (y - log_m)


def _reference_gradients(x, y, form, beta, labels, ignore_index, weights, per_element, need_x, need_y):
    derivatives = reference_derivatives(x.float(), y.float(), form, beta)
    weights = weights.float().reshape(x.shape) if per_element else weights.float().reshape(x.shape[:-1])[..., None]
    grads = [derivative * weights if need else None for derivative, need in zip(derivatives, (need_x, need_y))]
    if labels is not None:
        ignored = (labels.reshape(x.shape[:-1]) == ignore_index)[..., None]
        grads = [None if grad is None else torch.where(ignored, 0.0, grad) for grad in grads]
    return tuple(None if grad is None else grad.to(t.dtype) for grad, t in zip(grads, (x, y)))


# --- KL divergence -------------------------------------------------------------------------------------------

def _kl_form(log_target: bool) -> str:
    return "kl_log_target" if log_target else "kl_prob_target"


def _kl_divisor(x: torch.Tensor, reduction: str) -> int:
    return {"sum": 1, "mean": x.numel(), "batchmean": x.shape[0]}[reduction]


def _check_kl(input: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    check_log_probability_pair(_KL, ("input", "target"), input, target)
    if reduction not in KL_REDUCTIONS:
        fail(_KL, f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")


@define_op("kl_div", traced=False)
def _kl_div(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
            log_target: bool = False) -> torch.Tensor:
    _check_kl(input, target, reduction)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if reduction == "none":
        return loss_elements(input, target, _kl_form(log_target), dtype)
    total = divergence(input, target, _kl_form(log_target), with_rows=True)[0].sum()
    return (total / _kl_divisor(input, reduction)).to(dtype)


@_kl_div.register_fake
def _kl_div_fake(input, target, reduction="mean", log_target=False):
    _check_kl(input, target, reduction)
    dtype = torch.promote_types(input.dtype, target.dtype)
    return input.new_empty(input.shape if reduction == "none" else (), dtype=dtype)


@define_op("kl_div_backward", traced=False)
def _kl_div_backward(dloss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, reduction: str,
                     log_target: bool, input_grad: bool, target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dinput, dtarget), empty where not asked for."""
    options = dict(need_x=input_grad, need_y=target_grad)
    if reduction == "none":
        options["cotangent"] = dloss
    else:
        options["row_scale"] = (dloss.float() / _kl_divisor(input, reduction)).expand(input.numel() // input.shape[-1])
    _, dx, dy = divergence(input, target, _kl_form(log_target), **options)
    return dx if input_grad else input.new_empty(0), dy if target_grad else target.new_empty(0)


@_kl_div_backward.register_fake
def _kl_div_backward_fake(dloss, input, target, reduction, log_target, input_grad, target_grad):
    return gradient_placeholder(input, input_grad), gradient_placeholder(target, target_grad)


def _kl_setup_context(ctx, inputs, output):
    input, target, reduction, log_target = inputs
    ctx.save_for_backward(input, target)
    ctx.options = (reduction, log_target)


def _kl_backward(ctx, dloss):
    input, target = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[:2]
    dinput, dtarget = torch.ops.liger.kl_div_backward(dloss, input, target, *ctx.options, need_input, need_target)
    return dinput if need_input else None, dtarget if need_target else None, None, None


_kl_div.register_autograd(_kl_backward, setup_context=_kl_setup_context)
register_autocast("liger::kl_div", "fp32")  # as F.kl_div: fp32 on 16-bit inputs, on CPU and CUDA


def kl_div(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
           log_target: bool = False) -> torch.Tensor:
    """``F.kl_div(input, target, reduction=reduction, log_target=log_target)``, computed in fp32."""
    return torch.ops.liger.kl_div(input, target, reduction, log_target)


# --- Jensen-Shannon divergence -------------------------------------------------------------------------------

def _check_jsd(student, teacher, labels, beta, reduction) -> None:
    check_log_probability_pair(_JSD, ("student_logp", "teacher_logp"), student, teacher)
    check_same_device(_JSD, student_logp=student, labels=labels)
    check_labels(_JSD, labels, student.numel() // student.shape[-1])
    check_beta(_JSD, beta)
    check_reduction(_JSD, reduction)


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in JSD_REDUCTIONS:
        fail(op, f"reduction must be one of {JSD_REDUCTIONS}, got {reduction!r}")


def jsd_denominator(labels: torch.Tensor | None, n_rows: int, n_cols: int, ignore_index: int,
                    reduction: str) -> torch.Tensor | float:
    """What the summed rows are divided by (a 0-d fp32 tensor when it counts labels: no device sync)."""
    if reduction == "sum":
        return 1.0
    rows = n_rows if labels is None else (labels != ignore_index).sum().float()
    return rows if reduction == "batchmean" else rows * n_cols


def _jsd_sides(student, teacher, beta):
    """(form, x, y, student is x) with the sides in the order the form takes them."""
    form, student_is_x = jsd_form(beta)
    return (form, student, teacher, True) if student_is_x else (form, teacher, student, False)


@define_op("jsd_forward", traced=False)
def _jsd_forward(student_logp: torch.Tensor, teacher_logp: torch.Tensor, labels: Optional[torch.Tensor],
                 beta: float, ignore_index: int, reduction: str, student_grad: bool,
                 teacher_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dstudent_logp, dteacher_logp): the gradients for a cotangent of 1 where asked for (empty tensors
    otherwise), computed in the loss's pass."""
    _check_jsd(student_logp, teacher_logp, labels, beta, reduction)
    form, x, y, student_is_x = _jsd_sides(student_logp, teacher_logp, beta)
    n_rows = x.numel() // x.shape[-1]
    denominator = jsd_denominator(labels, n_rows, x.shape[-1], ignore_index, reduction)
    need_x, need_y = (student_grad, teacher_grad) if student_is_x else (teacher_grad, student_grad)
    scale = (torch.ones((), device=x.device) / denominator).expand(n_rows) if need_x or need_y else None
    rows, dx, dy = divergence(x, y, form, beta=beta, labels=labels, ignore_index=ignore_index, with_rows=True,
                              need_x=need_x, need_y=need_y, row_scale=scale)
    dstudent, dteacher = (dx, dy) if student_is_x else (dy, dx)
    return (rows.sum() / denominator, dstudent if student_grad else student_logp.new_empty(0),
            dteacher if teacher_grad else teacher_logp.new_empty(0))


@_jsd_forward.register_fake
def _jsd_forward_fake(student_logp, teacher_logp, labels, beta, ignore_index, reduction, student_grad,
                      teacher_grad):
    _check_jsd(student_logp, teacher_logp, labels, beta, reduction)
    return (student_logp.new_empty((), dtype=torch.float32),
            gradient_placeholder(student_logp, student_grad), gradient_placeholder(teacher_logp, teacher_grad))


def _jsd_setup_context(ctx, inputs, output):
    keep_gradients(ctx, output[1:])


def _jsd_backward(ctx, dloss, *_unused):
    if dloss is None:  # the loss itself was not used
        return (None,) * 8
    return (*scale_precomputed(ctx, _JSD, ctx.needs_input_grad[:2], dloss), *[None] * 6)


_jsd_forward.register_autograd(_jsd_backward, setup_context=_jsd_setup_context)

torch.library.define(
    "liger::jsd",
    "(Tensor student_logp, Tensor teacher_logp, Tensor? labels=None, float beta=0.5, int ignore_index=-100, "
    "str reduction='batchmean') -> Tensor",
)


@torch.library.impl("liger::jsd", "CompositeImplicitAutograd")
def _jsd(student_logp, teacher_logp, labels=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    needs = gradient_needs(student_logp, teacher_logp)
    return torch.ops.liger.jsd_forward(student_logp, teacher_logp, labels, beta, ignore_index, reduction, *needs)[0]


def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor | None = None, *,
        beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean") -> torch.Tensor:
    """The generalized Jensen-Shannon divergence between the student's and the teacher's log-probabilities
    (see this module's docstring); fp32."""
    return torch.ops.liger.jsd(student_logp, teacher_logp, labels, beta, ignore_index, reduction)
