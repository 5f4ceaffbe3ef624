"""Divergences between two distributions over the last dim of (N, V) rows: KL divergence and the generalized
Jensen-Shannon divergence of distillation. One program per row, fp32 math whatever the inputs' dtypes.

Per element, with x the student's (or ``F.kl_div``'s input's) log-probabilities and y the other side::

    KL_LOG_TARGET   loss = e^y (y - x)                          dx = -e^y        dy = e^y (y - x + 1)
    KL_PROB_TARGET  loss = xlogy(y, y) - y x                    dx = -y          dy = log y + y / y - x
    MIXTURE         m = beta e^y + (1 - beta) e^x
                    loss = beta e^y (y - log m) + (1 - beta) e^x (x - log m)
                                                                dx = (1 - beta) e^x (x - log m)
                                                                dy = beta e^y (y - log m)

KL_PROB_TARGET is ``F.kl_div`` with probabilities as target; its dy is what autograd gives for ``xlogy(y, y)``
(NaN where y is 0, as there). MIXTURE is the JSD for 0 < beta < 1: beta KL(P || M) + (1 - beta) KL(Q || M);
its two ends are KL_LOG_TARGET, with the sides swapped for beta = 1.

`divergence_rows` reads x and y as they are (log-probabilities, or probabilities for KL_PROB_TARGET).
`distillation_rows` reads logits instead: x = log_softmax(s / temperature), y = log_softmax(t / temperature),
and writes the gradient with respect to s over s itself (the fused linear op's chunk of student logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import traceable

KL_LOG_TARGET: tl.constexpr = tl.constexpr(0)
KL_PROB_TARGET: tl.constexpr = tl.constexpr(1)
MIXTURE: tl.constexpr = tl.constexpr(2)
FORMS = {"kl_log_target": KL_LOG_TARGET, "kl_prob_target": KL_PROB_TARGET, "mixture": MIXTURE}

SMALLEST_NORMAL: tl.constexpr = tl.constexpr(1.1754944e-38)  # of fp32

# Columns per step, warps and software-pipelining stages (benchmarks/tune_divergence.py on an H100), read at
# launch: the KLs stream at memory speed with wide steps; the mixture, bound by its exps and log, likes narrower.
BLOCK_V, NUM_WARPS, NUM_STAGES = 4096, 16, 2
MIXTURE_BLOCK_V, MIXTURE_NUM_WARPS, MIXTURE_NUM_STAGES = 2048, 8, 1


@triton.jit
def _pointwise(x, y, beta, FORM: tl.constexpr):
    """(loss, dloss/dx, dloss/dy) per element, fp32."""
    if FORM == KL_LOG_TARGET:
        p = tl.exp(y)
        loss = p * (y - x)
        dx = -p
        dy = loss + p
    elif FORM == KL_PROB_TARGET:
        log_y = tl.log(y)
        loss = tl.where(y == 0.0, 0.0, y * log_y) - y * x
        dx = -y
        dy = tl.where(y == 0.0, 0.0, log_y) + y / y - x
    else:
        p = tl.exp(y)
        q = tl.exp(x)
        # Where p and q both underflow, m does too: any finite log m then gives the terms' limit, 0.
        log_m = tl.log(tl.maximum(beta * p + (1.0 - beta) * q, SMALLEST_NORMAL))
        dy = beta * p * (y - log_m)
        dx = (1.0 - beta) * q * (x - log_m)
        loss = dx + dy
    return loss, dx, dy


@triton.jit
def _divergence_kernel(
    X, stride_x, Y, stride_y, LABELS, ROW_LOSS, ELEMENTS, stride_elements, COTANGENT, stride_cotangent,
    SCALE, stride_scale, DX, stride_dx, DY, stride_dy, n_cols, blocks_per_row, beta, ignore_index,
    FORM: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_ROW_LOSS: tl.constexpr, WRITE_ELEMENTS: tl.constexpr,
    ELEMENT_COTANGENT: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr, READ_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A row's losses summed need the whole row in one program (blocks_per_row 1); otherwise each program takes
    # one block of a row, which streams better.
    program = tl.program_id(0).to(tl.int64)
    row = program // blocks_per_row
    first = (program % blocks_per_row) * BLOCK
    step = blocks_per_row * BLOCK
    cols = tl.arange(0, BLOCK)
    x_row, y_row = X + row * stride_x, Y + row * stride_y
    ignored = row < 0  # no row is, without labels
    if HAS_LABELS:
        ignored = tl.load(LABELS + row) == ignore_index
    scale = 1.0
    if (WRITE_DX or WRITE_DY) and not ELEMENT_COTANGENT:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
    total = 0.0
    for start in range(first, n_cols, step):
        mask = start + cols < n_cols
        x = tl.zeros([BLOCK], tl.float32)
        if READ_X:
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + start + cols, mask=mask, other=1.0).to(tl.float32)
        loss, dx, dy = _pointwise(x, y, beta, FORM)
        if WRITE_ROW_LOSS:
            total += tl.sum(tl.where(mask, loss, 0.0), 0)
        if WRITE_ELEMENTS:
            out = ELEMENTS + row * stride_elements + start + cols
            tl.store(out, loss.to(ELEMENTS.dtype.element_ty), mask=mask)
        weight = scale
        if ELEMENT_COTANGENT:
            c = COTANGENT + row * stride_cotangent + start + cols
            weight = tl.load(c, mask=mask, other=0.0).to(tl.float32)
        if WRITE_DX:
            dx = tl.where(ignored, 0.0, dx * weight)
            tl.store(DX + row * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DY:
            dy = tl.where(ignored, 0.0, dy * weight)
            tl.store(DY + row * stride_dy + start + cols, dy.to(DY.dtype.element_ty), mask=mask)
    if WRITE_ROW_LOSS:
        tl.store(ROW_LOSS + row, tl.where(ignored, 0.0, total))


def _dummy_or(tensor: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else dummy


def _stride(tensor: torch.Tensor | None) -> int:
    return tensor.stride(0) if tensor is not None else 0


def divergence_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    form: str,
    beta: float = 0.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    row_loss: torch.Tensor | None = None,
    elements: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    cotangent: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    dy: torch.Tensor | None = None,
) -> None:
    """Over the rows of x and y (both (N, V), unit stride along V), in one pass, what is given:

    - `row_loss`: each row's summed loss, (N,) fp32, 0 on rows whose label is `ignore_index`;
    - `elements`: the loss per element, (N, V);
    - `dx` and/or `dy` ((N, V) each): the gradients, scaled per row by `scale` ((N,) fp32, stride 0 for one
      value) or per element by `cotangent` ((N, V)), 0 on ignored rows.
    """
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    with_grad = dx is not None or dy is not None
    # A KL's gradient with respect to its input is -target (or -exp(target)): that pass need not read the input.
    mixture = FORMS[form] == MIXTURE
    read_x = row_loss is not None or elements is not None or dy is not None or mixture
    block_v, num_warps, num_stages = ((MIXTURE_BLOCK_V, MIXTURE_NUM_WARPS, MIXTURE_NUM_STAGES) if mixture
                                      else (BLOCK_V, NUM_WARPS, NUM_STAGES))
    block = min(block_v, triton.next_power_of_2(n_cols))
    blocks_per_row = 1 if row_loss is not None else triton.cdiv(n_cols, block)
    traceable(_divergence_kernel)[(n_rows * blocks_per_row,)](
        x, x.stride(0), y, y.stride(0), _dummy_or(labels, x), _dummy_or(row_loss, x),
        _dummy_or(elements, x), _stride(elements), _dummy_or(cotangent, x), _stride(cotangent),
        _dummy_or(scale, x), _stride(scale), _dummy_or(dx, x), _stride(dx), _dummy_or(dy, x), _stride(dy),
        n_cols, blocks_per_row, beta, ignore_index,
        FORM=FORMS[form].value, HAS_LABELS=labels is not None, WRITE_ROW_LOSS=row_loss is not None,
        WRITE_ELEMENTS=elements is not None, ELEMENT_COTANGENT=with_grad and cotangent is not None,
        WRITE_DX=dx is not None, WRITE_DY=dy is not None, READ_X=read_x, BLOCK=block, num_warps=num_warps,
        num_stages=num_stages,
    )


@triton.jit
def _log_normalizer(row, cols, n_cols, temperature, BLOCK: tl.constexpr):
    """logsumexp of one row of logits divided by the temperature, online over column blocks."""
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(running_max, tl.max(z, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), 0)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _student_and_teacher(s_row, t_row, cols, mask, temperature, s_lse, t_lse, beta,
                         FORM: tl.constexpr, STUDENT_IS_X: tl.constexpr):
    """(loss, dloss/dstudent log-probabilities, student probabilities) for one block of a row of logits."""
    s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) / temperature - s_lse
    t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) / temperature - t_lse
    if STUDENT_IS_X:
        loss, d_student, _ = _pointwise(s, t, beta, FORM)
    else:
        loss, _, d_student = _pointwise(t, s, beta, FORM)
    return tl.where(mask, loss, 0.0), tl.where(mask, d_student, 0.0), tl.exp(s)


@triton.jit
def _distillation_kernel(
    S, stride_s, T, stride_t, LABELS, ROW_LOSS, SCALE, stride_scale, n_cols, beta, temperature, ignore_index,
    FORM: tl.constexpr, STUDENT_IS_X: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    s_row, t_row = S + row * stride_s, T + row * stride_t
    if HAS_LABELS:
        if tl.load(LABELS + row) == ignore_index:
            tl.store(ROW_LOSS + row, 0.0)
            if WITH_GRAD:
                for start in range(0, n_cols, BLOCK):
                    tl.store(s_row + start + cols, tl.zeros([BLOCK], S.dtype.element_ty), mask=start + cols < n_cols)
            return
    s_lse = _log_normalizer(s_row, cols, n_cols, temperature, BLOCK)
    t_lse = _log_normalizer(t_row, cols, n_cols, temperature, BLOCK)
    total = 0.0
    d_total = 0.0  # sum of the gradient with respect to the student's log-probabilities, for the softmax's
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        loss, d_student, _ = _student_and_teacher(s_row + start, t_row + start, cols, mask, temperature, s_lse,
                                                  t_lse, beta, FORM, STUDENT_IS_X)
        total += tl.sum(loss, 0)
        d_total += tl.sum(d_student, 0)
    tl.store(ROW_LOSS + row, total)
    if WITH_GRAD:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32) / temperature
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            _, d_student, q = _student_and_teacher(s_row + start, t_row + start, cols, mask, temperature, s_lse,
                                                   t_lse, beta, FORM, STUDENT_IS_X)
            grad = (d_student - q * d_total) * scale
            tl.store(s_row + start + cols, grad.to(S.dtype.element_ty), mask=mask)


def distillation_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    form: str,
    student_is_x: bool,
    beta: float,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
    row_loss: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> None:
    """Per row of (N, V) student and teacher logits: the divergence of their softmaxes at `temperature` into
    `row_loss` ((N,) fp32, 0 where the label is `ignore_index`), and, given `scale` ((N,) fp32, stride 0 for one
    value), the gradient of ``sum(scale * row_loss)`` with respect to the student logits, written over them.
    `student_is_x` says which side of the form the student is (see the module docstring)."""
    n_rows, n_cols = student.shape
    if n_rows == 0:
        return
    traceable(_distillation_kernel)[(n_rows,)](
        student, student.stride(0), teacher, teacher.stride(0), _dummy_or(labels, student), row_loss,
        _dummy_or(scale, student), _stride(scale), n_cols, beta, temperature, ignore_index,
        FORM=FORMS[form].value, STUDENT_IS_X=student_is_x, HAS_LABELS=labels is not None,
        WITH_GRAD=scale is not None, BLOCK=min(BLOCK_V, triton.next_power_of_2(n_cols)), num_warps=NUM_WARPS,
    )
