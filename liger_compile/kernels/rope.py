"""Rotary position embedding (rotate_half form): one Triton kernel for forward and backward, q and k together.

On the first ``rotary_dim`` columns of each head, with halves ``x1, x2`` and ``c1, c2`` / ``s1, s2`` of cos / sin:

    forward:   out1 = x1 * c1 - x2 * s1        out2 = x2 * c2 + x1 * s2     (x * cos + rotate_half(x) * sin)
    backward:  dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1    (the forward with sin -> (-s2, -s1))

and the remaining ``head_dim - rotary_dim`` columns are copied (partial rotary). Each product is rounded to the
tensor's dtype before the sum, as eager PyTorch rounds it, so a rewrite changes nothing but speed.

Tensors are seen as 4-D ``(n0, n1, n2, head_dim)`` with any strides, and their leading dims as one list of
*rows* (one head at one position each), the heads fastest. A program rotates ``BLOCK_R`` rows of q or of k: every
program has the same small amount of work, so the launch keeps HBM busy at any batch size, and k's few heads waste
no masked lanes of q's tiles. cos and sin are read through their broadcast (stride 0) strides; the rows of a tile
are heads of one position, so they share one cos/sin row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import traceable
from liger_compile.kernels._math import round_to

# Elements per tile of x1 (and of x2): rows × half the rotary columns. Chosen on an H200 by
# benchmarks/tune_rope.py (bf16, 32 q and 8 k heads of 128; batch 4 and 1 × 4096 positions, 8 × 1024): the
# fastest forward + backward on each shape.
TILE_ELEMENTS = 512
NUM_WARPS = 1


@triton.jit
def _rotate_rows(X, OUT, COS, SIN, first_row, n_rows, n1, n2, sx0, sx1, sx2, sxd, so0, so1, so2, sod,
                 sc0, sc1, sc2, scd, HALF: tl.constexpr, PASS: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotate rows ``first_row ..`` (of ``n_rows``, indexing dims of sizes (n_rows / (n1 n2), n1, n2)) of X into
    OUT."""
    dtype: tl.constexpr = OUT.dtype.element_ty
    rows = first_row + tl.arange(0, BLOCK_R).to(tl.int64)
    i2, i1, i0 = rows % n2, (rows // n2) % n1, rows // (n1 * n2)
    x_row = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    out_row = (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    cos_row = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    row_mask = (rows < n_rows)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = row_mask & (cols < HALF)
    c_at = cos_row + cols * scd
    c1 = tl.load(COS + c_at, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_at + HALF * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_at, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_at + HALF * scd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    x_at = X + x_row + cols * sxd
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    out1 = round_to(x1 * c1, dtype) - round_to(x2 * s1, dtype)
    out2 = round_to(x2 * c2, dtype) + round_to(x1 * s2, dtype)
    out_at = OUT + out_row + cols * sod
    tl.store(out_at, out1.to(dtype), mask=mask)
    tl.store(out_at + HALF * sod, out2.to(dtype), mask=mask)
    if PASS > 0:
        pass_cols = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = row_mask & (pass_cols < 2 * HALF + PASS)
        passed = tl.load(X + x_row + pass_cols * sxd, mask=pass_mask)
        tl.store(OUT + out_row + pass_cols * sod, passed, mask=pass_mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, q_programs, n_rows_q, n_rows_k, n1_q, n2_q, n1_k, n2_k,
                 sq0, sq1, sq2, sqd, sk0, sk1, sk2, skd, sqo0, sqo1, sqo2, sqod, sko0, sko1, sko2, skod,
                 scq0, scq1, scq2, sck0, sck1, sck2, scd,
                 HALF: tl.constexpr, PASS: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    program = tl.program_id(0)
    if program < q_programs:
        _rotate_rows(Q, QO, COS, SIN, program.to(tl.int64) * BLOCK_R, n_rows_q, n1_q, n2_q, sq0, sq1, sq2, sqd,
                     sqo0, sqo1, sqo2, sqod, scq0, scq1, scq2, scd,
                     HALF, PASS, BACKWARD, BLOCK_R, BLOCK_HALF, BLOCK_PASS)
    elif K is not None:  # compiled only for a pair; a single tensor launches q's programs alone
        _rotate_rows(K, KO, COS, SIN, (program - q_programs).to(tl.int64) * BLOCK_R, n_rows_k, n1_k, n2_k,
                     sk0, sk1, sk2, skd, sko0, sko1, sko2, skod, sck0, sck1, sck2, scd,
                     HALF, PASS, BACKWARD, BLOCK_R, BLOCK_HALF, BLOCK_PASS)


def heads_dim(cos_shape, differing=()) -> int:
    """The heads dim of 4-D shapes: the last leading dim along which 4-D cos has size 1 (dim 1 if there is none),
    preferring one of the `differing` dims, where q and k of a pair have different sizes: with a single position
    (batch and sequence of 1, as in decoding) cos has size 1 along every leading dim."""
    broadcast = [d for d in range(3) if cos_shape[d] == 1]
    preferred = [d for d in broadcast if d in differing]
    return (preferred or broadcast or [1])[-1]


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
         q_out: torch.Tensor, k_out: torch.Tensor | None, *, backward: bool) -> None:
    """Rotate 4-D `q` (and `k`, if given) into `q_out` (`k_out`), any strides.

    `cos` and `sin` are 4-D, of one shape and one set of strides, with an even last dim ``rotary_dim`` ≤ head_dim,
    broadcastable to q's and k's leading dims. `backward` applies the transposed rotation (to the output
    gradients, giving the input gradients).
    """
    half, head_dim = cos.shape[3] // 2, q.shape[3]
    # Rows run along the heads fastest, so that a tile's rows share one cos/sin row. Any order is exact: this one
    # is read from cos's shape alone, so that tracing it adds no guard on strides.
    heads = heads_dim(cos.shape)
    order = [d for d in range(3) if d != heads] + [heads]
    pairs = [(q, q_out)] + ([] if k is None else [(k, k_out)])
    # Multiplied out: torch.Size.numel() specializes symbolic sizes under torch.compile (torch 2.11).
    n_rows = [x.shape[0] * x.shape[1] * x.shape[2] for x, _ in pairs]
    block_half = triton.next_power_of_2(half)
    block_r = max(1, TILE_ELEMENTS // block_half)
    programs = [triton.cdiv(n, block_r) for n in n_rows]
    if sum(programs) == 0:
        return

    def sizes(x):
        return (x.shape[order[1]], x.shape[order[2]]) if x is not None else (1, 1)

    def strides(t):
        return (0, 0, 0, 0) if t is None else (*(t.stride(d) for d in order), t.stride(3))

    def cos_strides(x):
        return (0, 0, 0) if x is None else strides(cos.expand(*x.shape[:3], cos.shape[3]))[:3]

    # Without k, its pointers are None (a compile-time constant), not q's: torch.compile's functionalization
    # would otherwise see two mutated outputs aliasing one buffer.
    traceable(_rope_kernel)[(sum(programs),)](
        q, k, q_out, k_out, cos, sin, programs[0], n_rows[0], n_rows[-1] if k is not None else 0,
        *sizes(q), *sizes(k), *strides(q), *strides(k), *strides(q_out), *strides(k_out),
        *cos_strides(q), *cos_strides(k), cos.stride(3),
        HALF=half, PASS=head_dim - 2 * half, BACKWARD=backward,
        BLOCK_R=block_r, BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(head_dim - 2 * half, 1)),
        num_warps=NUM_WARPS,
    )
