"""RMSNorm and LayerNorm forward and backward Triton kernels and their launchers.

One pair of kernels serves both norms: LayerNorm is the RMSNorm of the row minus its mean, plus a bias. Inputs
are 2-D (rows, hidden) with unit stride along hidden. Statistics and arithmetic are fp32.

RMSNorm's casting mode says where intermediates are rounded, so that the kernel reproduces the rounding of the
PyTorch code it replaces:

- ``llama``: ``y = (x.float() * rstd).to(x.dtype) * w_eff``, stored in ``promote(x.dtype, w.dtype)``
- ``gemma``: ``y = (x.float() * rstd * w_eff).to(x.dtype)``
- ``none``:  every intermediate rounded to ``x.dtype`` as plain ``x.dtype`` arithmetic does

where ``rstd = rsqrt(mean(x**2) + eps)`` and ``w_eff = offset + w`` rounded to ``w.dtype`` (the value of
``offset + w`` in PyTorch).

LayerNorm computes as ``F.layer_norm`` does: ``y = ((x - mean) * rstd * w + b).to(x.dtype)`` with
``rstd = rsqrt(mean((x - mean)**2) + eps)``, everything in fp32 and rounded once (the gemma mode, centered).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import persistent_programs, row_tile, traceable
from liger_compile.kernels._math import round_to

CASTING_MODES = ("llama", "gemma", "none")
_GEMMA: tl.constexpr = tl.constexpr(1)
_NONE: tl.constexpr = tl.constexpr(2)

# Launch parameters, chosen by benchmarks/tune_norm.py on an H100 (bf16; hidden 128, 1024, 4096, 8192, 16384):
# widest row tile kept in registers; wider rows are processed in column blocks of this size
MAX_BLOCK_N = 16384
# elements per program tile (narrow rows are processed several at a time) and per thread (sets the warps)
FORWARD_TILE_ELEMENTS = 2048
FORWARD_ELEMENTS_PER_THREAD = 16
BACKWARD_TILE_ELEMENTS = 8192
BACKWARD_ELEMENTS_PER_THREAD = 16
# at most 16 warps: a row of 16384 in 32 warps leaves each thread 64 registers, and spills (1.35x slower)
MAX_WARPS = 16
# backward programs per multiprocessor: each takes every n-th block of rows and owns one fp32 row of dW
# partial sums, so this also sets the workspace (programs x hidden x 4 bytes: 2 MiB at hidden 4096 on 132 SMs)
BACKWARD_PROGRAMS_PER_SM = 1
# software-pipelining depth of the backward's loop over rows; rows wider than 8192 do not pipeline (the
# prefetched copies of x and dy do not fit beside the dW partial sums: 1.2x slower for RMSNorm, 8x LayerNorm)
BACKWARD_STAGES = 3
WIDE_ROW_BACKWARD_STAGES = 1


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
def _store_normalized(centered, Y_rows, W, B, cols, mask, col_mask, rstd, offset,
                      X_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr):
    """Normalise a loaded fp32 tile (minus the row mean for LayerNorm), apply weight and bias, store to Y."""
    y = _multiplied_by_weight(centered * rstd[:, None], X_DTYPE, MODE)
    if HAS_WEIGHT:
        y = y * _weight_factor(W, cols, col_mask, offset)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y_rows + cols[None, :], y.to(Y_rows.dtype.element_ty), mask=mask)


@triton.jit
def _load_input(X_rows, R, H, rows64, stride_r, stride_h, cols, mask, X_DTYPE: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """A tile of the normalised input in fp32: x, or h = x + residual rounded to x's dtype as eager's add
    rounds it (stored to H when STORE_SUM)."""
    x = tl.load(X_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, X_DTYPE)
        if STORE_SUM:
            tl.store(H + rows64 * stride_h + cols[None, :], x.to(X_DTYPE), mask=mask)
    return x


@triton.jit
def _norm_forward_kernel(
    X, R, W, B, Y, H, MEAN, RSTD,
    n_rows, n_cols, stride_x, stride_r, stride_y,
    eps, offset,
    CENTERED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    # With a residual the kernel normalises h = x + residual and also writes h (contiguous, like Y).
    X_DTYPE: tl.constexpr = X.dtype.element_ty
    # Inductor may pass Python floats as fp64 (config._use_fp64_for_unbacked_floats): keep the math in fp32.
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows[:, None].to(tl.int64)
    X_rows = X + rows64 * stride_x
    Y_rows = Y + rows64 * stride_y
    cols = tl.arange(0, BLOCK_N)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)

    if SINGLE_PASS:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_input(X_rows, R, H, rows64, stride_r, stride_y, cols, mask, X_DTYPE, HAS_RESIDUAL, True)
        if CENTERED:
            mean = tl.sum(x, axis=1) / n_cols
            x = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(_squares(x, X_DTYPE, MODE), axis=1), n_cols, eps, X_DTYPE, MODE)
        _store_normalized(x, Y_rows, W, B, cols, mask, col_mask, rstd, offset, X_DTYPE, HAS_WEIGHT, HAS_BIAS, MODE)
    else:
        # One pass for the statistics: sums of squares for RMSNorm; for LayerNorm each block's mean and sum of
        # squared deviations, merged into the running ones (Chan et al.), which stays accurate where
        # sum(x**2) - n * mean**2 would cancel.
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            block_cols = start + cols
            mask = row_mask[:, None] & (block_cols < n_cols)[None, :]
            x = _load_input(X_rows, R, H, rows64, stride_r, stride_y, block_cols, mask, X_DTYPE, HAS_RESIDUAL,
                            True)
            if CENTERED:
                seen = start * 1.0
                count = tl.sum((block_cols < n_cols).to(tl.float32), axis=0)
                block_mean = tl.sum(x, axis=1) / count
                deviation = tl.where(mask, x - block_mean[:, None], 0.0)
                delta = block_mean - mean
                total = seen + count
                mean += delta * (count / total)
                sum_sq += tl.sum(deviation * deviation, axis=1) + delta * delta * (seen * count / total)
            else:
                sum_sq += tl.sum(_squares(x, X_DTYPE, MODE), axis=1)
        rstd = _rstd(sum_sq, n_cols, eps, X_DTYPE, MODE)
        for start in range(0, n_cols, BLOCK_N):
            block_cols = start + cols
            col_mask = block_cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            # h again from x and the residual: reading back H would need a barrier between the passes
            x = _load_input(X_rows, R, H, rows64, stride_r, stride_y, block_cols, mask, X_DTYPE, HAS_RESIDUAL,
                            False)
            if CENTERED:
                x = x - mean[:, None]
            _store_normalized(x, Y_rows, W, B, block_cols, mask, col_mask, rstd, offset, X_DTYPE, HAS_WEIGHT,
                              HAS_BIAS, MODE)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    if CENTERED:
        tl.store(MEAN + rows, mean, mask=row_mask)


@triton.jit
def _backward_block(DY_rows, X_rows, cols, mask, mean, rstd, w_eff,
                    CENTERED: tl.constexpr, HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr):
    """Loads one tile and returns (xhat, dxhat, dy, dW contribution) in fp32; `w_eff` is the weight factor
    tile. Masked columns give dxhat = 0, so they add nothing to the row sums."""
    x = tl.load(X_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if CENTERED:
        x = x - mean[:, None]
    xhat = x * rstd[:, None]
    dw = dy * _multiplied_by_weight(xhat, X_rows.dtype.element_ty, MODE)
    if HAS_WEIGHT:
        dxhat = dy * w_eff[None, :]
    else:
        dxhat = dy
    return xhat, dxhat, dy, dw


@triton.jit
def _store_input_gradient(DX_rows, DH, rows64, stride_dh, cols, mask, xhat, dxhat, mean_dot, mean_dxhat, rstd,
                          CENTERED: tl.constexpr, HAS_DH: tl.constexpr):
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat) [- mean(dxhat) for LayerNorm]) [+ dh, the gradient h
    gets from its other uses, when the input was x + residual]."""
    dx = dxhat - xhat * mean_dot[:, None]
    if CENTERED:
        dx = dx - mean_dxhat[:, None]
    dx = dx * rstd[:, None]
    if HAS_DH:
        dx += tl.load(DH + rows64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX_rows + cols[None, :], dx.to(DX_rows.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    DY, X, W, MEAN, RSTD, DH, DX, DW_PARTIAL, DB_PARTIAL,
    n_rows, n_cols, stride_dy, stride_x, stride_dh, stride_dx,
    offset,
    CENTERED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # A persistent grid: each program takes every num_programs-th block of rows and owns one row of
    # DW_PARTIAL (and DB_PARTIAL), so dW and dB need no atomics (the launcher sums the partial rows afterwards).
    offset = tl.cast(offset, tl.float32)  # see the forward kernel
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        col_mask = cols < n_cols
        w_eff = _weight_factor(W, cols, col_mask, offset) if HAS_WEIGHT else 0.0  # loaded once per program
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for row_block in tl.range(pid, n_row_blocks, n_programs, num_stages=NUM_STAGES):
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows[:, None].to(tl.int64)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0) if CENTERED else rstd
            xhat, dxhat, dy, dw = _backward_block(DY + rows64 * stride_dy, X + rows64 * stride_x, cols, mask, mean,
                                                  rstd, w_eff, CENTERED, HAS_WEIGHT, MODE)
            if COMPUTE_DW:
                dw_acc += dw
            if COMPUTE_DB:
                db_acc += dy
            mean_dot = tl.sum(dxhat * xhat, axis=1) / n_cols
            mean_dxhat = tl.sum(dxhat, axis=1) / n_cols if CENTERED else mean_dot
            _store_input_gradient(DX + rows64 * stride_dx, DH, rows64, stride_dh, cols, mask, xhat, dxhat, mean_dot,
                                  mean_dxhat, rstd, CENTERED, HAS_DH)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if COMPUTE_DB:
            tl.store(DB_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        for row_block in range(pid, n_row_blocks, n_programs):
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            rows64 = rows[:, None].to(tl.int64)
            DY_rows = DY + rows64 * stride_dy
            X_rows = X + rows64 * stride_x
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0) if CENTERED else rstd
            dot = tl.zeros([BLOCK_M], dtype=tl.float32)
            sum_dxhat = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                block_cols = start + cols
                col_mask = block_cols < n_cols
                w_eff = _weight_factor(W, block_cols, col_mask, offset) if HAS_WEIGHT else 0.0
                xhat, dxhat, dy, dw = _backward_block(DY_rows, X_rows, block_cols,
                                                      row_mask[:, None] & col_mask[None, :], mean, rstd, w_eff,
                                                      CENTERED, HAS_WEIGHT, MODE)
                dot += tl.sum(dxhat * xhat, axis=1)
                if CENTERED:
                    sum_dxhat += tl.sum(dxhat, axis=1)
            mean_dot = dot / n_cols
            mean_dxhat = sum_dxhat / n_cols
            for start in range(0, n_cols, BLOCK_N):
                block_cols = start + cols
                col_mask = block_cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                w_eff = _weight_factor(W, block_cols, col_mask, offset) if HAS_WEIGHT else 0.0
                xhat, dxhat, dy, dw = _backward_block(DY_rows, X_rows, block_cols, mask, mean, rstd, w_eff,
                                                      CENTERED, HAS_WEIGHT, MODE)
                _store_input_gradient(DX + rows64 * stride_dx, DH, rows64, stride_dh, block_cols, mask, xhat,
                                      dxhat, mean_dot, mean_dxhat, rstd, CENTERED, HAS_DH)
                if COMPUTE_DW:
                    _accumulate(DW_PARTIAL + pid.to(tl.int64) * n_cols + block_cols, col_mask, dw)
                if COMPUTE_DB:
                    _accumulate(DB_PARTIAL + pid.to(tl.int64) * n_cols + block_cols, col_mask, dy)


@triton.jit
def _accumulate(PARTIAL_cols, col_mask, values):
    """Add a tile's column sums to this program's row of partial sums."""
    partial = tl.load(PARTIAL_cols, mask=col_mask, other=0.0)
    tl.store(PARTIAL_cols, partial + tl.sum(values, axis=0), mask=col_mask)


def _forward(x, residual, weight, bias, eps, offset, casting_mode, out_dtype, centered, max_block_n, shape):
    """(y, h = x + residual or None, mean or None, rstd) for 2-D `x` and `residual` with unit column stride;
    `max_block_n` None means MAX_BLOCK_N, read at each launch (as every launch parameter here, so that
    benchmarks/tune_norm.py can set them)."""
    n_rows, n_cols = x.shape[0], int(x.shape[1])  # block sizes derive from hidden: specialise it if symbolic
    shape = tuple(shape or x.shape)
    y = torch.empty(shape, dtype=out_dtype, device=x.device)  # contiguous: rows n_cols apart
    h = None if residual is None else torch.empty(shape, dtype=x.dtype, device=x.device)  # as y
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    mean = torch.empty(shape[:-1], dtype=torch.float32, device=x.device) if centered else None
    if n_rows == 0:  # an empty grid is not a valid launch
        return y, h, mean, rstd
    tile = row_tile(n_cols, max_block_n=max_block_n or MAX_BLOCK_N, tile_elements=FORWARD_TILE_ELEMENTS,
                    elements_per_thread=FORWARD_ELEMENTS_PER_THREAD, max_warps=MAX_WARPS)
    traceable(_norm_forward_kernel)[(triton.cdiv(n_rows, tile.block_m),)](
        x, residual, weight, bias, y, h, mean, rstd,
        n_rows, n_cols, x.stride(0), 0 if residual is None else residual.stride(0), n_cols,
        eps, offset,
        CENTERED=centered, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, MODE=CASTING_MODES.index(casting_mode),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_PASS=tile.single_pass,
        num_warps=tile.num_warps,
    )
    return y, h, mean, rstd


def _backward(dy, x, weight, mean, rstd, dh, offset, casting_mode, compute_dw, compute_db, max_block_n, shape):
    """(dx [+ dh], dW partial rows or None, dB partial rows or None) for 2-D unit-stride inputs."""
    n_rows, n_cols = x.shape[0], int(x.shape[1])  # block sizes derive from hidden: specialise it if symbolic
    dx = torch.empty(tuple(shape or x.shape), dtype=x.dtype, device=x.device)  # contiguous: rows n_cols apart
    tile = row_tile(n_cols, max_block_n=max_block_n or MAX_BLOCK_N, tile_elements=BACKWARD_TILE_ELEMENTS,
                    elements_per_thread=BACKWARD_ELEMENTS_PER_THREAD, max_warps=MAX_WARPS)
    stages = BACKWARD_STAGES if tile.block_n <= 8192 else WIDE_ROW_BACKWARD_STAGES
    programs = persistent_programs(x.device, BACKWARD_PROGRAMS_PER_SM)
    # The looped path accumulates into its partial rows, so they must start from zero.
    alloc = torch.empty if tile.single_pass else torch.zeros

    def partial_rows(needed):
        return alloc((programs, n_cols), dtype=torch.float32, device=x.device) if needed else None

    dw_partial, db_partial = partial_rows(compute_dw), partial_rows(compute_db)
    traceable(_norm_backward_kernel)[(programs,)](
        dy, x, weight, mean, rstd, dh, dx, dw_partial, db_partial,
        n_rows, n_cols, dy.stride(0), x.stride(0), 0 if dh is None else dh.stride(0), n_cols,
        offset,
        CENTERED=mean is not None, HAS_WEIGHT=weight is not None, HAS_DH=dh is not None, COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        MODE=CASTING_MODES.index(casting_mode),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINGLE_PASS=tile.single_pass, NUM_STAGES=stages,
        num_warps=tile.num_warps,
    )
    return dx, dw_partial, db_partial


def _summed(partial: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if partial is None else partial.sum(0).to(like.dtype)


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: float,
    casting_mode: str,
    out_dtype: torch.dtype,
    *,
    max_block_n: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (rows, hidden) in `out_dtype` and rstd (rows,) in fp32 for a 2-D `x` with unit column stride; with
    `shape`, y has that shape and rstd shape[:-1] (the caller's leading dims: outputs are not views)."""
    y, _, _, rstd = _forward(x, None, weight, None, eps, offset, casting_mode, out_dtype, False, max_block_n, shape)
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
    dh: torch.Tensor | None = None,
    max_block_n: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx like `x` (or of `shape`), and dW in the weight's dtype when `compute_dw` (else None), for 2-D
    unit-stride inputs. With `dh` (2-D like x), dx + dh: the gradient of both operands of h = x + residual."""
    compute_dw = compute_dw and weight is not None
    dx, dw_partial, _ = _backward(dy, x, weight, None, rstd, dh, offset, casting_mode, compute_dw, False,
                                  max_block_n, shape)
    return dx, _summed(dw_partial, weight)


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    max_block_n: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y like `x`, and mean and rstd (rows,) in fp32, for a 2-D `x` with unit column stride (with `shape`: y
    of that shape, the statistics of shape[:-1])."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, 0.0, "gemma", x.dtype, True, max_block_n, shape)
    return y, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
    *,
    dh: torch.Tensor | None = None,
    max_block_n: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx like `x` (or of `shape`), dW like the weight when `compute_dw` and dB in fp32 when `compute_db`
    (else None). With `dh`, dx + dh, as `rms_norm_backward`."""
    compute_dw = compute_dw and weight is not None
    dx, dw_partial, db_partial = _backward(dy, x, weight, mean, rstd, dh, 0.0, "gemma", compute_dw, compute_db,
                                           max_block_n, shape)
    return dx, _summed(dw_partial, weight), (None if db_partial is None else db_partial.sum(0))


def add_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool,
    offset: float = 0.0,
    casting_mode: str = "gemma",
    out_dtype: torch.dtype | None = None,
    max_block_n: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(y, h, mean or None, rstd): h = x + residual rounded to x's dtype, y its LayerNorm (`centered`; bias
    allowed) or RMSNorm (offset and casting mode as `rms_norm_forward`), in one pass over x and the residual
    (2-D, unit column stride, one dtype)."""
    return _forward(x, residual, weight, bias, eps, offset, casting_mode, out_dtype or x.dtype, centered,
                    max_block_n, shape)
