"""RMSNorm forward and backward Triton kernels and their launchers.

Inputs are 2-D (rows, hidden) with unit stride along hidden. Statistics and arithmetic are fp32; the casting
mode says where intermediates are rounded, so that the kernel reproduces the rounding of the PyTorch code it
replaces:

- ``llama``: ``y = (x.float() * rstd).to(x.dtype) * w_eff``, stored in ``promote(x.dtype, w.dtype)``
- ``gemma``: ``y = (x.float() * rstd * w_eff).to(x.dtype)``
- ``none``:  every intermediate rounded to ``x.dtype`` as plain ``x.dtype`` arithmetic does

where ``rstd = rsqrt(mean(x**2) + eps)`` and ``w_eff = offset + w`` rounded to ``w.dtype`` (the value of
``offset + w`` in PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import persistent_programs, row_tile, traceable
from liger_compile.kernels._math import round_to

CASTING_MODES = ("llama", "gemma", "none")
_GEMMA: tl.constexpr = tl.constexpr(1)
_NONE: tl.constexpr = tl.constexpr(2)

# Launch parameters, chosen by benchmarks/tune_rms_norm.py on an H100 (bf16; hidden 128, 1024, 4096, 16384):
# widest row tile kept in registers; wider rows are processed in column blocks of this size
MAX_BLOCK_N = 8192
# elements per program tile (narrow rows are processed several at a time) and per thread (sets the warps)
FORWARD_TILE_ELEMENTS = 2048
FORWARD_ELEMENTS_PER_THREAD = 16
BACKWARD_TILE_ELEMENTS = 8192
BACKWARD_ELEMENTS_PER_THREAD = 16
# backward programs per multiprocessor: each takes every n-th block of rows and owns one fp32 row of dW
# partial sums, so this also sets the workspace (programs x hidden x 4 bytes: 2 MiB at hidden 4096 on 132 SMs)
BACKWARD_PROGRAMS_PER_SM = 1
# software-pipelining depth of the backward's loop over rows
BACKWARD_STAGES = 3


@triton.jit
def _squares(x, X_DTYPE: tl.constexpr, MODE: tl.constexpr):
    if MODE == _NONE:
        return round_to(x * x, X_DTYPE)
    return x * x


@triton.jit
def _rstd(sum_sq, n_cols, eps, X_DTYPE: tl.constexpr, MODE: tl.constexpr):
    mean_sq = sum_sq / n_cols
    if MODE == _NONE:
        return round_to(tl.rsqrt(round_to(round_to(mean_sq, X_DTYPE) + eps, X_DTYPE)), X_DTYPE)
    return tl.rsqrt(mean_sq + eps)


@triton.jit
def _weight_factor(W, cols, col_mask, offset):
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    return round_to(w + offset, W.dtype.element_ty)


@triton.jit
def _multiplied_by_weight(xhat, X_DTYPE: tl.constexpr, MODE: tl.constexpr):
    """The normalized value as it enters the weight multiply: rounded to x's dtype except in gemma mode."""
    if MODE == _GEMMA:
        return xhat
    return round_to(xhat, X_DTYPE)


@triton.jit
def _store_normalized(x, Y_rows, W, cols, mask, col_mask, rstd, offset,
                      X_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr):
    """Normalise a loaded fp32 tile `x`, scale it by the weight factor and store it to Y's dtype."""
    y = _multiplied_by_weight(x * rstd[:, None], X_DTYPE, MODE)
    if HAS_WEIGHT:
        y = y * _weight_factor(W, cols, col_mask, offset)[None, :]
    tl.store(Y_rows + cols[None, :], y.to(Y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD,
    n_rows, n_cols, stride_x, stride_y,
    eps, offset,
    HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    # Inductor may pass Python floats as fp64 (config._use_fp64_for_unbacked_floats): keep the math in fp32.
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    X_rows = X + rows[:, None].to(tl.int64) * stride_x
    Y_rows = Y + rows[:, None].to(tl.int64) * stride_y
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = _rstd(tl.sum(_squares(x, X_DTYPE, MODE), axis=1), n_cols, eps, X_DTYPE, MODE)
        _store_normalized(x, Y_rows, W, cols, mask, col_mask, rstd, offset, X_DTYPE, HAS_WEIGHT, MODE)
    else:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols < n_cols)[None, :]
            x = tl.load(X_rows + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(_squares(x, X_DTYPE, MODE), axis=1)
        rstd = _rstd(sum_sq, n_cols, eps, X_DTYPE, MODE)
        for start in range(0, n_cols, BLOCK_N):
            block_cols = start + cols
            col_mask = block_cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X_rows + block_cols[None, :], mask=mask, other=0.0).to(tl.float32)
            _store_normalized(x, Y_rows, W, block_cols, mask, col_mask, rstd, offset, X_DTYPE, HAS_WEIGHT, MODE)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _backward_block(DY_rows, X_rows, cols, mask, rstd, w_eff, HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr):
    """Loads one tile and returns (xhat, dxhat, dW contribution) in fp32; `w_eff` is the weight factor tile."""
    x = tl.load(X_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    dw = dy * _multiplied_by_weight(xhat, X_rows.dtype.element_ty, MODE)
    if HAS_WEIGHT:
        dxhat = dy * w_eff[None, :]
    else:
        dxhat = dy
    return xhat, dxhat, dw


@triton.jit
def _rms_norm_backward_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_x, stride_dx,
    offset,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # A persistent grid: each program takes every num_programs-th block of rows and owns one row of
    # DW_PARTIAL, so dW needs no atomics (the launcher sums the partial rows afterwards).
    offset = tl.cast(offset, tl.float32)  # see the forward kernel
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        col_mask = cols < n_cols
        w_eff = _weight_factor(W, cols, col_mask, offset) if HAS_WEIGHT else 0.0  # loaded once per program
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for row_block in tl.range(pid, n_row_blocks, n_programs, num_stages=NUM_STAGES):
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows[:, None].to(tl.int64)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat, dxhat, dw = _backward_block(DY + rows64 * stride_dy, X + rows64 * stride_x, cols, mask, rstd,
                                              w_eff, HAS_WEIGHT, MODE)
            if COMPUTE_DW:
                dw_acc += dw
            mean_dot = tl.sum(dxhat * xhat, axis=1) / n_cols
            dx = (dxhat - xhat * mean_dot[:, None]) * rstd[:, None]
            tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        for row_block in range(pid, n_row_blocks, n_programs):
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            rows64 = rows[:, None].to(tl.int64)
            DY_rows = DY + rows64 * stride_dy
            X_rows = X + rows64 * stride_x
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            dot = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                block_cols = start + cols
                col_mask = block_cols < n_cols
                w_eff = _weight_factor(W, block_cols, col_mask, offset) if HAS_WEIGHT else 0.0
                xhat, dxhat, dw = _backward_block(DY_rows, X_rows, block_cols, row_mask[:, None] & col_mask[None, :],
                                                  rstd, w_eff, HAS_WEIGHT, MODE)
                dot += tl.sum(dxhat * xhat, axis=1)
            mean_dot = dot / n_cols
            for start in range(0, n_cols, BLOCK_N):
                block_cols = start + cols
                col_mask = block_cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                w_eff = _weight_factor(W, block_cols, col_mask, offset) if HAS_WEIGHT else 0.0
                xhat, dxhat, dw = _backward_block(DY_rows, X_rows, block_cols, mask, rstd, w_eff, HAS_WEIGHT, MODE)
                dx = (dxhat - xhat * mean_dot[:, None]) * rstd[:, None]
                tl.store(DX + rows64 * stride_dx + block_cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    DW_cols = DW_PARTIAL + pid.to(tl.int64) * n_cols + block_cols
                    partial = tl.load(DW_cols, mask=col_mask, other=0.0)
                    tl.store(DW_cols, partial + tl.sum(dw, axis=0), mask=col_mask)


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    casting_mode: str,
    out_dtype: torch.dtype,
    *,
    max_block_n: int = MAX_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (rows, hidden) in `out_dtype` and rstd (rows,) in fp32 for a 2-D `x` with unit column stride."""
    n_rows, n_cols = x.shape[0], int(x.shape[1])  # block sizes derive from hidden: specialise it if symbolic
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:  # an empty grid is not a valid launch
        return y, rstd
    tile = row_tile(n_cols, max_block_n=max_block_n, tile_elements=FORWARD_TILE_ELEMENTS,
                    elements_per_thread=FORWARD_ELEMENTS_PER_THREAD)
    traceable(_rms_norm_forward_kernel)[(triton.cdiv(n_rows, tile.block_m),)](
        x, weight, y, rstd,
        n_rows, n_cols, x.stride(0), y.stride(0),
        eps, offset,
        HAS_WEIGHT=weight is not None, MODE=CASTING_MODES.index(casting_mode),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_PASS=tile.single_pass,
        num_warps=tile.num_warps,
    )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    compute_dw: bool,
    *,
    max_block_n: int = MAX_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx like `x`, and dW in the weight's dtype when `compute_dw` (else None), for 2-D unit-stride inputs."""
    n_rows, n_cols = x.shape[0], int(x.shape[1])  # block sizes derive from hidden: specialise it if symbolic
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    compute_dw = compute_dw and weight is not None
    tile = row_tile(n_cols, max_block_n=max_block_n, tile_elements=BACKWARD_TILE_ELEMENTS,
                    elements_per_thread=BACKWARD_ELEMENTS_PER_THREAD)
    programs = persistent_programs(x.device, BACKWARD_PROGRAMS_PER_SM)
    # The looped path accumulates into its partial row, so it must start from zero.
    alloc = torch.empty if tile.single_pass else torch.zeros
    dw_partial = alloc((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else None
    traceable(_rms_norm_backward_kernel)[(programs,)](
        dy, x, weight, rstd, dx, dw_partial,
        n_rows, n_cols, dy.stride(0), x.stride(0), dx.stride(0),
        offset,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, MODE=CASTING_MODES.index(casting_mode),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_PASS=tile.single_pass, NUM_STAGES=BACKWARD_STAGES,
        num_warps=tile.num_warps,
    )
    return dx, (dw_partial.sum(0).to(weight.dtype) if compute_dw else None)
