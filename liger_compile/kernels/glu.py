"""Gated activations ``act(a) * b`` (SwiGLU, GeGLU): Triton forward and backward kernels and their launchers.

Inputs are 2-D (rows, cols) with unit column stride and any row stride, so the two halves of a fused
``gate_up`` projection are read in place (row stride 2 × cols) and the backward can write both gradients into
the halves of one buffer. The math is fp32; intermediates are rounded where PyTorch's eager code rounds them
(the activation's output, and ``dy * b`` before the activation's backward), so a rewrite changes nothing but
speed. The backward reads only ``a``, ``b`` and ``dy`` and recomputes the activation; it can also write the
product ``act(a) * b`` (what a following linear layer's weight gradient needs), bit for bit the forward's.

Activations: ``silu``; ``gelu_tanh`` (``F.gelu(approximate="tanh")``); ``gelu`` (exact, with erf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import row_tile, traceable
from liger_compile.kernels._math import round_to

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_SILU: tl.constexpr = tl.constexpr(0)
_GELU_TANH: tl.constexpr = tl.constexpr(1)

# Tile of a program (several rows when rows are narrow) and elements per thread (sets the warps): a
# memory-bound elementwise kernel wants 16-byte accesses and thousands of programs in flight. Chosen on an
# H100 by benchmarks/tune_glu.py (bf16, 16384 × 14336 and 16384 × 4096: within 1% of the best of each pass).
TILE_ELEMENTS = 8192
ELEMENTS_PER_THREAD = 8

_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_GELU_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)
_RSQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_RSQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid(z):
    # exp overflows to inf for very negative z, giving exactly 0: no inf/inf or inf-inf on either tail.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activation(a, ACTIVATION: tl.constexpr, WITH_DERIVATIVE: tl.constexpr):
    """act(a) and, if asked, act'(a) (else 0), in fp32."""
    if ACTIVATION == _SILU:
        s = _sigmoid(a)
        value = a * s
        derivative = s * (1.0 + a * (1.0 - s)) if WITH_DERIVATIVE else 0.0
    elif ACTIVATION == _GELU_TANH:
        # 0.5 * (1 + tanh(u)) = sigmoid(2u): no tanh (which the interpreter lacks) and no cancellation in
        # 1 + tanh(u) for large negative u
        inner = _SQRT_2_OVER_PI * a * (1.0 + _GELU_TANH_CUBIC * a * a)
        s = _sigmoid(2.0 * inner)
        value = a * s
        if WITH_DERIVATIVE:
            d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * a * a)
            derivative = s + 2.0 * a * s * (1.0 - s) * d_inner
        else:
            derivative = 0.0
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _RSQRT_2))
        value = a * cdf
        derivative = cdf + a * _RSQRT_2PI * tl.exp(-0.5 * a * a) if WITH_DERIVATIVE else 0.0
    return value, derivative


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows (int64, as a column vector), columns (as a row vector) and bounds mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None].to(tl.int64), cols[None, :], mask


@triton.jit
def _glu_forward_kernel(A, B, Y, n_rows, n_cols, stride_a, stride_b, stride_y,
                        ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = Y.dtype.element_ty
    a = tl.load(A + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    activated, _ = _activation(a, ACTIVATION, False)
    tl.store(Y + rows * stride_y + cols, (round_to(activated, dtype) * b).to(dtype), mask=mask)


@triton.jit
def _glu_backward_kernel(DY, A, B, DA, DB, Y, n_rows, n_cols, stride_dy, stride_a, stride_b, stride_da, stride_db,
                         stride_y, ACTIVATION: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = DA.dtype.element_ty
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    activated, derivative = _activation(a, ACTIVATION, True)
    # eager: db = dy * round(act(a)); d_act = round(dy * b); da = d_act * act'(a)
    tl.store(DB + rows * stride_db + cols, (dy * round_to(activated, dtype)).to(dtype), mask=mask)
    tl.store(DA + rows * stride_da + cols, (round_to(dy * b, dtype) * derivative).to(dtype), mask=mask)
    if WRITE_Y:
        tl.store(Y + rows * stride_y + cols, (round_to(activated, dtype) * b).to(dtype), mask=mask)


def _launch(kernel, n_rows: int, n_cols: int, *args, activation: str, **constexprs) -> None:
    if n_rows == 0 or n_cols == 0:  # an empty grid is not a valid launch
        return
    tile = row_tile(n_cols, max_block_n=TILE_ELEMENTS, tile_elements=TILE_ELEMENTS,
                    elements_per_thread=ELEMENTS_PER_THREAD)
    grid = (triton.cdiv(n_rows, tile.block_m), triton.cdiv(n_cols, tile.block_n))
    traceable(kernel)[grid](*args, n_rows, n_cols, *(t.stride(0) for t in args),
                            ACTIVATION=ACTIVATIONS.index(activation), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                            num_warps=tile.num_warps, **constexprs)


def glu_forward(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, activation: str) -> None:
    """y = act(a) * b for 2-D tensors of one shape and dtype, each with unit column stride (views allowed)."""
    n_rows, n_cols = a.shape[0], int(a.shape[1])  # the tile derives from the width: specialise it if symbolic
    _launch(_glu_forward_kernel, n_rows, n_cols, a, b, y, activation=activation)


def glu_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
                 activation: str, y: torch.Tensor | None = None) -> None:
    """Write the gradients of act(a) * b into `da` and `db`, and the product into `y` if given (2-D, unit column
    stride, views allowed)."""
    n_rows, n_cols = a.shape[0], int(a.shape[1])
    _launch(_glu_backward_kernel, n_rows, n_cols, dy, a, b, da, db, da if y is None else y, activation=activation,
            WRITE_Y=y is not None)
