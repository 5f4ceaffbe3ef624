"""Student and teacher lm_heads + the generalized JSD in row chunks, so that neither's (N, V) logits exist at once.

``torch.ops.liger.fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
beta=0.5, ignore_index=-100, temperature=1.0, reduction="batchmean", chunk_rows=0)`` computes::

    liger::jsd(log_softmax(student_hidden @ student_weight.T / temperature),
               log_softmax(teacher_hidden @ teacher_weight.T / temperature), labels, beta, ignore_index, reduction)

(see `liger_compile.ops.divergence`) with hidden (N, H) and weight (V, H) per side, each side of one dtype; the
logits are computed in that dtype, as ``F.linear`` computes them, and everything after in fp32.

For each chunk of `chunk_rows` rows: two GEMMs give the chunk's student and teacher logits, one kernel gives its
loss and overwrites the student logits with their gradient (softmax at temperature included), and two more
GEMMs give the chunk's part of the student's hidden and weight gradients, computed in forward for a cotangent
of 1 and scaled in backward. The teacher gets no gradient: its tensors must not require one (an error says so
when backward would need it). `chunk_rows` 0 chooses chunks of 1 GiB of logits (both sides together).
"""

from __future__ import annotations

from typing import Optional

import torch

from liger_compile.kernels import divergence as kernels
from liger_compile.kernels._launch import can_launch
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
from liger_compile.ops.divergence import (
    check_beta,
    check_labels,
    check_reduction,
    jsd_denominator,
    jsd_form,
    reference_derivatives,
    reference_elements,
)

_OP = "fused_linear_jsd"


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, temperature,
                  reduction):
    sides = (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight))
    for side, hidden, weight in sides:
        check_float_tensor(_OP, f"{side}_hidden", hidden)
        check_float_tensor(_OP, f"{side}_weight", weight)
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
            fail(_OP, f"{side}_hidden must be (N, H) and {side}_weight (V, H) with V >= 1, got "
                      f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        if hidden.dtype != weight.dtype:
            fail(_OP, f"{side}_hidden ({hidden.dtype}) and {side}_weight ({weight.dtype}) must have one dtype")
    check_same_device(_OP, student_hidden=student_hidden, student_weight=student_weight,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=labels)
    if student_hidden.shape[0] != teacher_hidden.shape[0] or student_weight.shape[0] != teacher_weight.shape[0]:
        fail(_OP, f"student and teacher must have the same rows and vocabulary, got logits "
                  f"({student_hidden.shape[0]}, {student_weight.shape[0]}) and "
                  f"({teacher_hidden.shape[0]}, {teacher_weight.shape[0]})")
    check_labels(_OP, labels, student_hidden.shape[0])
    check_beta(_OP, beta)
    if not temperature > 0:
        fail(_OP, f"temperature must be > 0, got {temperature}")
    check_reduction(_OP, reduction)


def _distillation_reference(student_logits, teacher_logits, form, student_is_x, beta, temperature, labels,
                            ignore_index, scale):
    """(row losses, gradient with respect to the student logits or None) in PyTorch, fp32."""
    student = torch.log_softmax(student_logits.float() / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, -1)
    x, y = (student, teacher) if student_is_x else (teacher, student)
    ignored = None if labels is None else labels == ignore_index
    rows = reference_elements(x, y, form, beta).sum(-1)
    rows = rows if ignored is None else torch.where(ignored, 0.0, rows)
    if scale is None:
        return rows, None
    d_student = reference_derivatives(x, y, form, beta)[0 if student_is_x else 1]
    grad = (d_student - student.exp() * d_student.sum(-1, keepdim=True)) * (scale / temperature)[:, None]
    return rows, grad if ignored is None else torch.where(ignored[:, None], 0.0, grad)


def _chunked(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, ignore_index,
             temperature, chunk_rows, scale, needs):
    """Each row's loss, and with row scales the student's (hidden, weight) gradients `needs` asks for."""
    n_rows, n_classes = student_hidden.shape[0], student_weight.shape[0]
    row_bytes = n_classes * (student_hidden.dtype.itemsize + teacher_hidden.dtype.itemsize)
    chunk = chunk_rows_for(_OP, n_rows, row_bytes, chunk_rows)
    form, student_is_x = jsd_form(beta)
    rows = student_hidden.new_empty(n_rows, dtype=torch.float32)
    grad_hidden, grad_weight = gradient_placeholder(student_hidden, needs[0]), gradient_placeholder(student_weight,
                                                                                                    needs[1])
    labels = None if labels is None else labels.contiguous()
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        hidden_chunk = student_hidden[start:end]
        student_logits = hidden_chunk @ student_weight.t()
        teacher_logits = teacher_hidden[start:end] @ teacher_weight.t()
        chunk_labels = None if labels is None else labels[start:end]
        chunk_scale = None if scale is None else scale[start:end]
        options = dict(beta=beta, temperature=temperature, labels=chunk_labels, ignore_index=ignore_index)
        if can_launch(student_logits):
            kernels.distillation_rows(student_logits, teacher_logits, form=form, student_is_x=student_is_x,
                                      row_loss=rows[start:end], scale=chunk_scale, **options)
        else:
            rows[start:end], grad = _distillation_reference(student_logits, teacher_logits, form, student_is_x,
                                                            scale=chunk_scale, **options)
            if grad is not None:
                student_logits.copy_(grad)
        del teacher_logits
        if scale is None:
            continue
        dlogits = student_logits  # overwritten with its gradient
        add_linear_gradients(dlogits, hidden_chunk, student_weight, start, grad_hidden if needs[0] else None,
                             grad_weight if needs[1] else None)
        del student_logits, dlogits  # before the next chunk's logits are allocated
    return rows, grad_hidden, grad_weight


@define_op("fused_linear_jsd_forward", traced=False)
def _forward(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: Optional[torch.Tensor], beta: float, ignore_index: int,
    temperature: float, reduction: str, chunk_rows: int, grad_hidden: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dstudent_hidden, dstudent_weight): the gradients for a cotangent of 1 where asked for (empty
    tensors otherwise)."""
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, temperature,
                  reduction)
    n_rows, n_classes = student_hidden.shape[0], student_weight.shape[0]
    denominator = jsd_denominator(labels, n_rows, n_classes, ignore_index, reduction)
    needs = (grad_hidden, grad_weight)
    scale = None
    if any(needs):
        scale = (torch.ones((), device=student_hidden.device) / denominator).expand(n_rows)
    rows, *grads = _chunked(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta,
                            ignore_index, temperature, chunk_rows, scale, needs)
    return (rows.sum() / denominator, *grads)


@_forward.register_fake
def _forward_fake(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, ignore_index,
                  temperature, reduction, chunk_rows, grad_hidden, grad_weight):
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, temperature,
                  reduction)
    return (student_hidden.new_empty((), dtype=torch.float32),
            gradient_placeholder(student_hidden, grad_hidden), gradient_placeholder(student_weight, grad_weight))


def _setup_context(ctx, inputs, output):
    keep_gradients(ctx, output[1:])


def _backward(ctx, dloss, *_unused):
    if any(ctx.needs_input_grad[2:4]):
        fail(_OP, "the teacher gets no gradient: detach teacher_hidden and teacher_weight (or run the teacher "
                  "under torch.no_grad())")
    if dloss is None:  # the loss itself was not used
        return (None,) * 12
    grads = scale_precomputed(ctx, _OP, ctx.needs_input_grad[:2], dloss)
    return (*grads, *[None] * 10)


_forward.register_autograd(_backward, setup_context=_setup_context)
# both lm_heads in autocast's dtype, as F.linear computes them
register_autocast("liger::fused_linear_jsd_forward", "lower")

torch.library.define(
    "liger::fused_linear_jsd",
    "(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor? labels=None, float beta=0.5, int ignore_index=-100, float temperature=1., str reduction='batchmean', "
    "int chunk_rows=0) -> Tensor",
)


@torch.library.impl("liger::fused_linear_jsd", "CompositeImplicitAutograd")
def _fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, beta=0.5,
                      ignore_index=-100, temperature=1.0, reduction="batchmean", chunk_rows=0):
    needs = gradient_needs(student_hidden, student_weight)
    return torch.ops.liger.fused_linear_jsd_forward(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, beta, ignore_index, temperature,
        reduction, chunk_rows, *needs)[0]


def fused_linear_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    chunk_rows: int = 0,
) -> torch.Tensor:
    """The JSD of the student's and teacher's softmaxes at `temperature` without materialising either's logits;
    differentiable in the student's hidden states and weight. fp32."""
    return torch.ops.liger.fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                            beta, ignore_index, temperature, reduction, chunk_rows)
