"""The weight gradient of a linear layer summed over row chunks: ``out += a.T @ b`` in place, for a short
reduction (a chunk of rows, K of a few hundred) and a large output (the lm_head's V × H weight gradient).

A row-chunked fused linear loss adds each chunk's ``dlogits.T @ hidden_chunk`` to the weight gradient, so with
small chunks this read-modify-write of the whole gradient, not the multiply, sets the time: at K = 256 cuBLAS's
``addmm_`` into a 128256 × 4096 bf16 gradient takes twice as long as it would at K = 4096 for the same rows
(`benchmarks/probe_chunk_gemms.py`). Here each program loads its tile of the old gradient before it multiplies,
so that read overlaps the tile's dot products instead of following them, then adds the fp32 product to it and
rounds once, as ``addmm_`` does with beta = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import INTERPRETING, traceable


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    load_first: bool = True


# The interpreter runs every program in turn on the CPU, so it gets the smallest tiles tl.dot takes.
TILES = Tiles(32, 32, 16, 4, 1) if INTERPRETING else Tiles(128, 128, 64, 8, 3)
# Triton's interpreter multiplies bf16 tiles as if they held integers (Triton 3.9), so there the tiles are
# upcast first; the GPU multiplies them as they are, accumulating in fp32 either way.
UPCAST_TILES = INTERPRETING
# Output rows of one column of programs visited before moving to the next column: neighbours share a's tiles in L2.
GROUP_M = 8


@triton.jit
def _accumulate_kernel(OUT, A, B, M, N, K, stride_om, stride_on, stride_ak, stride_am, stride_bk, stride_bn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       UPCAST_TILES: tl.constexpr, LOAD_FIRST: tl.constexpr):
    programs_m = tl.cdiv(M, BLOCK_M)
    programs_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    programs_per_group = GROUP_M * programs_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(programs_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
    # int64 offsets: V * H (a 262144-row vocabulary) can pass 2**31
    out_ptrs = OUT + rows[:, None].to(tl.int64) * stride_om + cols[None, :].to(tl.int64) * stride_on
    if LOAD_FIRST:
        previous = tl.load(out_ptrs, mask=out_mask, other=0.0)

    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None].to(tl.int64) * stride_am + ks[None, :].to(tl.int64) * stride_ak  # a.T's tile
    b_ptrs = B + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        in_k = ks < K - start
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & (cols < N)[None, :], other=0.0)
        if UPCAST_TILES:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")  # fp32 tiles multiply in fp32, as cuBLAS does
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if not LOAD_FIRST:
        previous = tl.load(out_ptrs, mask=out_mask, other=0.0)
    acc += previous.to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=out_mask)


def accumulate_transposed_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                   tiles: Tiles = TILES) -> torch.Tensor:
    """``out += a.T @ b`` for a (K, M), b (K, N) and out (M, N), all of one dtype, any strides; the
    product in fp32, added to `out` in fp32 and rounded once. Returns `out`."""
    (n_k, n_rows), n_cols = a.shape, b.shape[1]
    if n_rows == 0 or n_cols == 0:  # an empty grid is not a valid launch
        return out
    grid = (triton.cdiv(n_rows, tiles.block_m) * triton.cdiv(n_cols, tiles.block_n),)
    traceable(_accumulate_kernel)[grid](
        out, a, b, n_rows, n_cols, n_k, *out.stride(), *a.stride(), *b.stride(), BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=GROUP_M, UPCAST_TILES=UPCAST_TILES,
        LOAD_FIRST=tiles.load_first, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
