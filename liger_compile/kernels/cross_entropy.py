"""Cross-entropy over the rows of (N, V) logits: one program per row, fp32 math whatever the logits' dtype.

For row i with label y (rows labelled ``ignore_index`` are skipped: loss, z and lse 0, gradient 0)::

    x      = logits[i], optionally softcapped: cap * tanh(x / cap), each step rounded to the logits' dtype
    lse    = log(sum_c exp(x_c))                        (online: a running max and sum over column blocks)
    loss_i = w_y (1 - eps) (lse - x_y) + eps / V (lse sum_c w_c - sum_c w_c x_c)
    z_i    = z_scale lse^2

with class weights w (all 1 without), label smoothing eps and z-loss scale z_scale. The gradient of
``g_i loss_i + h_i z_i`` with respect to x_c is::

    p_c (g_i (w_y (1 - eps) + eps sum_w / V) + 2 h_i z_scale lse) - g_i (w_y (1 - eps) [c == y] + eps w_c / V)

times the softcap's derivative 1 - tanh^2. A label outside [0, V) (and not ignored) gives a NaN loss row and a
NaN gradient; the ops check labels before launching whenever they can do so without a device sync.

Three modes: STATS writes loss, z and lse; GRAD reads lse and writes the gradient; STATS_AND_GRAD does both
in one program (the fused linear op, whose gradient scale is known in forward), and may write the gradient
over the logits it read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import traceable
from liger_compile.kernels._math import round_to

STATS: tl.constexpr = tl.constexpr(0)
GRAD: tl.constexpr = tl.constexpr(1)
STATS_AND_GRAD: tl.constexpr = tl.constexpr(2)
_MODES = {"stats": STATS, "grad": GRAD, "stats_and_grad": STATS_AND_GRAD}

# Columns per step and warps, set on an H100 when the kernel was written; unlike the other kernels, no
# benchmarks/tune_*.py sweep records them.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _load_logits(row, cols, mask, softcap, dtype: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(x, dx/dlogits) for the columns `cols` of one row; masked-off columns are -inf with derivative 0."""
    x = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    derivative = 1.0
    if HAS_SOFTCAP:
        # tanh(u) = 2 sigmoid(2u) - 1 (the interpreter has no tanh); each rounding is one eager stores.
        t = round_to(2.0 * tl.sigmoid(2.0 * round_to(x / softcap, dtype)) - 1.0, dtype)
        x = round_to(t * softcap, dtype)
        derivative = 1.0 - t * t
    return tl.where(mask, x, float("-inf")), derivative


@triton.jit
def _cross_entropy_kernel(
    X, stride_x, Y, stride_y, TARGET, CLASS_WEIGHT, CLASS_WEIGHT_SUM,
    LOSS, Z, LSE, G, H, stride_scale,
    n_cols, ignore_index, label_smoothing, z_scale, softcap,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype: tl.constexpr = X.dtype.element_ty
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    target = tl.load(TARGET + row).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_cols)

    if ignored:
        if MODE != GRAD:
            tl.store(LOSS + row, 0.0)
            tl.store(Z + row, 0.0)
            tl.store(LSE + row, 0.0)
        if MODE != STATS:
            for start in range(0, n_cols, BLOCK):
                tl.store(y_row + start + cols, tl.zeros([BLOCK], dtype), mask=start + cols < n_cols)
        return

    target_weight = 1.0
    weight_sum = n_cols * 1.0
    if HAS_WEIGHT:
        target_weight = tl.load(CLASS_WEIGHT + tl.where(valid, target, 0)).to(tl.float32)
        weight_sum = tl.load(CLASS_WEIGHT_SUM).to(tl.float32)
    smoothing_per_class = label_smoothing / n_cols

    if MODE == GRAD:
        lse = tl.load(LSE + row)
    else:
        running_max = float("-inf")
        running_sum = 0.0
        weighted_sum = 0.0  # sum_c w_c x_c, for label smoothing
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x, _ = _load_logits(x_row, start + cols, mask, softcap, dtype, HAS_SOFTCAP)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row whose blocks so far are all -inf
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
            running_max = new_max
            x_in_row = tl.where(mask, x, 0.0)
            if HAS_WEIGHT:
                x_in_row *= tl.load(CLASS_WEIGHT + start + cols, mask=mask, other=0.0).to(tl.float32)
            weighted_sum += tl.sum(x_in_row, 0)
        lse = running_max + tl.log(running_sum)
        target_logit, _ = _load_logits(x_row, tl.where(valid, target, 0), True, softcap, dtype, HAS_SOFTCAP)
        loss = target_weight * (1.0 - label_smoothing) * (lse - target_logit)
        if label_smoothing > 0:  # (skipped, as 0 * inf is NaN where a logit is -inf)
            loss += smoothing_per_class * (lse * weight_sum - weighted_sum)
        tl.store(LOSS + row, tl.where(valid, loss, float("nan")))
        tl.store(Z + row, z_scale * lse * lse)
        tl.store(LSE + row, lse)

    if MODE != STATS:
        g = tl.load(G + row * stride_scale).to(tl.float32)
        h = tl.load(H + row * stride_scale).to(tl.float32)
        lse = tl.where(valid, lse, float("nan"))
        probability_coefficient = g * (target_weight * (1.0 - label_smoothing) + smoothing_per_class * weight_sum)
        probability_coefficient += 2.0 * h * z_scale * lse
        target_coefficient = g * target_weight * (1.0 - label_smoothing)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x, derivative = _load_logits(x_row, start + cols, mask, softcap, dtype, HAS_SOFTCAP)
            grad = tl.exp(x - lse) * probability_coefficient
            grad -= tl.where(start + cols == target, target_coefficient, 0.0)
            if HAS_WEIGHT:
                w = tl.load(CLASS_WEIGHT + start + cols, mask=mask, other=0.0).to(tl.float32)
                grad -= g * smoothing_per_class * w
            else:
                grad -= g * smoothing_per_class
            tl.store(y_row + start + cols, (grad * derivative).to(dtype), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    class_weight_sum: torch.Tensor | None,
    *,
    mode: str,
    ignore_index: int,
    label_smoothing: float,
    z_scale: float,
    softcap: float | None,
    loss: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> None:
    """Launch one program per row of `logits` (N, V), unit stride along V.

    mode ``"stats"`` fills loss, z and lse (fp32, (N,)); ``"grad"`` reads lse and fills grad; ``"stats_and_grad"``
    does both (grad may be `logits` itself). g and h scale each row's loss and z-loss gradient: (N,) fp32, or
    one value expanded to (N,) (stride 0).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    dummy = logits  # pointer arguments a mode does not read
    scale = g if g is not None else dummy
    traceable(_cross_entropy_kernel)[(n_rows,)](
        logits, logits.stride(0), grad if grad is not None else dummy, grad.stride(0) if grad is not None else 0,
        target, class_weight, class_weight_sum,
        loss if loss is not None else dummy, z if z is not None else dummy, lse if lse is not None else dummy,
        scale, h if h is not None else dummy, scale.stride(0) if g is not None else 0,
        n_cols, ignore_index, label_smoothing, z_scale, softcap if softcap is not None else 1.0,
        MODE=_MODES[mode].value, HAS_WEIGHT=class_weight is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK=min(BLOCK_V, triton.next_power_of_2(n_cols)), num_warps=NUM_WARPS,
    )
