"""Rotary position embedding (rotate_half form): one Triton kernel for forward and backward, q and k together.

On the first ``rotary_dim`` columns of each head, with halves ``x1, x2`` and ``c1, c2`` / ``s1, s2`` of cos / sin:

    forward:   out1 = x1 * c1 - x2 * s1        out2 = x2 * c2 + x1 * s2     (x * cos + rotate_half(x) * sin)
    backward:  dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1    (the forward with sin -> (-s2, -s1))

and the remaining ``head_dim - rotary_dim`` columns are copied (partial rotary). Each product is rounded to the
tensor's dtype before the sum, as eager PyTorch rounds it, so a rewrite changes nothing but speed.

Tensors are seen as 4-D ``(n0, n1, n2, head_dim)`` with any strides. cos and sin, broadcast to that shape, are
constant along one of the three leading dims, the *heads* dim (``H`` in ``(B, H, T, D)`` with cos
``(B, 1, T, D)``, or in ``(B, T, H, D)`` with cos ``(B, T, 1, D)``); the other two are *positions*. A program
takes one position, loads its cos/sin row once and rotates every head of q and then of k there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import traceable
from liger_compile.kernels._math import round_to

# Elements per tile of x1 (and of x2): rows of heads × half the rotary columns. Chosen on an H100 by
# benchmarks/tune_rope.py (bf16, 32 q and 8 k heads of 128, batch 4 and 1 × 4096 positions): within 2% of the
# best setting of each pass and shape.
TILE_ELEMENTS = 2048
NUM_WARPS = 4


@triton.jit
def _sin_halves(at, half_offset, mask, BACKWARD: tl.constexpr):
    """The halves of a sin row in fp32; for the backward rotation, (-s2, -s1)."""
    s1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(at + half_offset, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    return s1, s2


@triton.jit
def _rotate_heads(X, OUT, x_offset, out_offset, n_heads, stride_xh, stride_xd, stride_oh, stride_od,
                  c1, c2, s1, s2, COS, SIN, cos_offset, stride_ch, stride_cd,
                  HALF: tl.constexpr, PASS: tl.constexpr, COS_PER_HEAD: tl.constexpr, BACKWARD: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotate the `n_heads` rows of one position of X into OUT, BLOCK_H heads at a time."""
    dtype: tl.constexpr = OUT.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = cols < HALF
    for first_head in range(0, n_heads, BLOCK_H):
        heads = (first_head + tl.arange(0, BLOCK_H))[:, None].to(tl.int64)
        mask = (heads < n_heads) & col_mask
        if COS_PER_HEAD:
            c_at = cos_offset + heads * stride_ch + cols * stride_cd
            cos1 = tl.load(COS + c_at, mask=mask, other=0.0).to(tl.float32)
            cos2 = tl.load(COS + c_at + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
            sin1, sin2 = _sin_halves(SIN + c_at, HALF * stride_cd, mask, BACKWARD)
        else:
            cos1, cos2, sin1, sin2 = c1, c2, s1, s2
        x_at = X + x_offset + heads * stride_xh + cols * stride_xd
        x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        out1 = round_to(x1 * cos1, dtype) - round_to(x2 * sin1, dtype)
        out2 = round_to(x2 * cos2, dtype) + round_to(x1 * sin2, dtype)
        out_at = OUT + out_offset + heads * stride_oh + cols * stride_od
        tl.store(out_at, out1.to(dtype), mask=mask)
        tl.store(out_at + HALF * stride_od, out2.to(dtype), mask=mask)
        if PASS > 0:
            pass_cols = tl.arange(0, BLOCK_PASS)[None, :]
            pass_mask = (heads < n_heads) & (pass_cols < PASS)
            passed = tl.load(X + x_offset + heads * stride_xh + (2 * HALF + pass_cols) * stride_xd, mask=pass_mask)
            tl.store(OUT + out_offset + heads * stride_oh + (2 * HALF + pass_cols) * stride_od, passed,
                     mask=pass_mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, n_inner, n_heads_q, n_heads_k,
                 sq_outer, sq_inner, sq_head, sq_col, sk_outer, sk_inner, sk_head, sk_col,
                 sqo_outer, sqo_inner, sqo_head, sqo_col, sko_outer, sko_inner, sko_head, sko_col,
                 sc_outer, sc_inner, sc_head, sc_col,
                 HALF: tl.constexpr, PASS: tl.constexpr, COS_PER_HEAD: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    position = tl.program_id(0).to(tl.int64)
    outer, inner = position // n_inner, position % n_inner
    cos_offset = outer * sc_outer + inner * sc_inner
    c1, c2, s1, s2 = 0.0, 0.0, 0.0, 0.0
    if not COS_PER_HEAD:  # one cos/sin row serves every head of q and k here
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        c_at = cos_offset + cols * sc_col
        c1 = tl.load(COS + c_at, mask=cols < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(COS + c_at + HALF * sc_col, mask=cols < HALF, other=0.0).to(tl.float32)
        s1, s2 = _sin_halves(SIN + c_at, HALF * sc_col, cols < HALF, BACKWARD)
    _rotate_heads(Q, QO, outer * sq_outer + inner * sq_inner, outer * sqo_outer + inner * sqo_inner, n_heads_q,
                  sq_head, sq_col, sqo_head, sqo_col, c1, c2, s1, s2, COS, SIN, cos_offset, sc_head, sc_col,
                  HALF, PASS, COS_PER_HEAD, BACKWARD, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    if K is not None:
        _rotate_heads(K, KO, outer * sk_outer + inner * sk_inner, outer * sko_outer + inner * sko_inner, n_heads_k,
                      sk_head, sk_col, sko_head, sko_col, c1, c2, s1, s2, COS, SIN, cos_offset, sc_head, sc_col,
                      HALF, PASS, COS_PER_HEAD, BACKWARD, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


@dataclass(frozen=True)
class Layout:
    """How 4-D views of the tensors split into positions (outer, inner) and heads: dims by index."""

    outer: int
    inner: int
    heads: int
    cos_per_head: bool  # cos varies along the heads dim too, so it is loaded with each tile of heads


def layout(cos_shape, differing=()) -> Layout:
    """The heads dim is the last leading dim along which 4-D cos has size 1 (dim 1 if there is none), preferring
    one of the `differing` dims, where q and k of a pair have different sizes: with a single position (batch and
    sequence of 1, as in decoding) cos has size 1 along every leading dim."""
    broadcast = [d for d in range(3) if cos_shape[d] == 1]
    preferred = [d for d in broadcast if d in differing]
    heads = (preferred or broadcast or [1])[-1]
    outer, inner = (d for d in range(3) if d != heads)
    return Layout(outer, inner, heads, cos_per_head=not broadcast)


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
         q_out: torch.Tensor, k_out: torch.Tensor | None, *, backward: bool) -> None:
    """Rotate 4-D `q` (and `k`, if given) into `q_out` (`k_out`), any strides.

    `cos` and `sin` are 4-D, of one shape, with an even last dim ``rotary_dim`` ≤ head_dim, broadcastable to q's
    and k's leading dims; q and k agree on every dim but the heads dim (see `layout`). `backward` applies the
    transposed rotation (to the output gradients, giving the input gradients).
    """
    lay = layout(cos.shape, () if k is None else [d for d in range(3) if q.shape[d] != k.shape[d]])
    full_cos, full_sin = (t.expand(*q.shape[:3], t.shape[3]) for t in (cos, sin))
    n_outer, n_inner = q.shape[lay.outer], q.shape[lay.inner]
    if n_outer * n_inner == 0:
        return
    half, head_dim = cos.shape[3] // 2, q.shape[3]
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(TILE_ELEMENTS // block_half, triton.next_power_of_2(max(q.shape[lay.heads], 1))))

    def strides(t):
        return (0, 0, 0, 0) if t is None else (t.stride(lay.outer), t.stride(lay.inner), t.stride(lay.heads), t.stride(3))

    # Without k, its pointers are None (a compile-time constant), not q's: torch.compile's functionalization
    # would otherwise see two mutated outputs aliasing one buffer.
    traceable(_rope_kernel)[(n_outer * n_inner,)](
        q, k, q_out, k_out, full_cos, full_sin, n_inner, q.shape[lay.heads], 0 if k is None else k.shape[lay.heads],
        *strides(q), *strides(k), *strides(q_out), *strides(k_out), *strides(full_cos),
        HALF=half, PASS=head_dim - 2 * half, COS_PER_HEAD=lay.cos_per_head, BACKWARD=backward,
        BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(head_dim - 2 * half, 1)),
        num_warps=NUM_WARPS,
    )
