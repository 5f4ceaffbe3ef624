"""Experimental int8 × ternary ("BitNet b1.58") matmul: int8 activations times 2-bit packed weights, exact in int32.

Packing format. Ternary weights ``w`` of shape (K, N), the right operand of ``x @ w``, hold integers in
{-1, 0, 1}; K is a multiple of 4. Packed, they are a uint8 tensor of shape (K // 4, N) whose bits 2j..2j+1 of
``packed[p, n]`` hold the code ``w[j * (K // 4) + p, n] + 1`` (codes 0, 1, 2; 3 is invalid and unpacks to 2),
for j = 0..3. This "block" layout along K puts the four quarters of K in one byte, so the kernel loads a packed
tile once and multiplies it four times, with four shifts, by four tiles of the activations. In PyTorch:

    w = torch.cat([((packed >> 2 * j) & 3) for j in range(4)], dim=0).to(torch.int8) - 1

The kernel: C (M, N) int32 = A (M, K) int8, any strides, @ w, unpacked tile by tile in registers and never
written to memory; ``tl.dot`` of int8 tiles accumulates in int32, so the result is exact (each sum is at most
128 * K in size: no overflow for K below 2**24).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import INTERPRETING, traceable

# Tiles of C and packed rows (a quarter of K's columns each, four dots per step): within 1% of the fastest of
# benchmarks/tune_int2_matmul.py's sweep on an H200 (M = 4096, K × N = 4096 × 14336 and 14336 × 4096); one pass
# over the packed weights per quarter of K, as liger-kernel loops, measured 10% slower with this code. The
# interpreter runs every program in turn on the CPU, so it gets the smallest tiles tl.dot takes.
if INTERPRETING:
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 16, 32, 16, 4, 1
else:
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 3
# Row tiles of one column of programs visited before moving to the next column: neighbours share B's tiles in L2.
GROUP_M = 8


@triton.jit
def _int2_matmul_kernel(A, B, C, M, N, K4, stride_am, stride_ak, stride_bp, stride_bn, stride_cm, stride_cn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    packed_rows = tl.arange(0, BLOCK_K)
    # int64 offsets: M * K (activations of many tokens) can pass 2**31
    a_ptrs = A + rows[:, None].to(tl.int64) * stride_am + packed_rows[None, :].to(tl.int64) * stride_ak
    b_ptrs = B + packed_rows[:, None].to(tl.int64) * stride_bp + cols[None, :].to(tl.int64) * stride_bn
    quarter = tl.cast(K4, tl.int64) * stride_ak  # from one quarter of A's columns to the next
    row_mask = (rows < M)[:, None]
    col_mask = (cols < N)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, K4, BLOCK_K):
        in_k = packed_rows < K4 - start
        # past K // 4, a is 0 whatever w unpacks to
        packed = tl.load(b_ptrs, mask=in_k[:, None] & col_mask, other=0)
        quarter_ptrs = a_ptrs
        for j in tl.static_range(4):
            a = tl.load(quarter_ptrs, mask=row_mask & in_k[None, :], other=0)
            w = (((packed >> (2 * j)) & 3).to(tl.int8) - 1).to(tl.int8)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            quarter_ptrs += quarter
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bp

    c_ptrs = C + rows[:, None].to(tl.int64) * stride_cm + cols[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc, mask=row_mask & col_mask)


def int2_matmul(a: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
    """out (M, N) int32 = a (M, K) int8 @ the weights `packed` (K // 4, N) uint8 holds (see the module's format).

    Any strides for all three; the caller checks dtypes, shapes and devices.
    """
    n_rows, n_cols, n_packed = a.shape[0], packed.shape[1], packed.shape[0]
    if n_rows == 0 or n_cols == 0:  # an empty grid is not a valid launch
        return
    grid = (triton.cdiv(n_rows, BLOCK_M) * triton.cdiv(n_cols, BLOCK_N),)
    traceable(_int2_matmul_kernel)[grid](
        a, packed, out, n_rows, n_cols, n_packed, a.stride(0), a.stride(1), packed.stride(0), packed.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
