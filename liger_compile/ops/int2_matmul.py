"""Experimental: int8 activations times 2-bit packed ternary weights (BitNet b1.58-style inference), exact in int32.

- ``torch.ops.liger.matmul_int2_int8(x, w_packed)``: x int8 (..., K) @ the ternary weights w (K, N) that
  w_packed (K // 4, N) packs, uint8 (or int8 holding the same bits), as int32 (..., N). Integer tensors take no
  gradient, so the op has no autograd formula; it traces under torch.compile.
- `pack_int2(w)` / `unpack_int2(w_packed)`: the packing format (see `liger_compile.kernels.int2_matmul`).

The Triton kernel unpacks the weights tile by tile in registers. The reference unpacks them whole and multiplies
in int32 on the CPU; PyTorch has no int32 matmul on CUDA, where the reference (after a kernel failed to compile)
multiplies in float64, which holds every partial sum exactly.
"""

from __future__ import annotations

import math

import torch

from liger_compile.kernels import int2_matmul as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import check_same_device, define_op, fail

_OP = "matmul_int2_int8"
PACKED_DTYPES = (torch.uint8, torch.int8)
CODES_PER_BYTE = 4


def pack_int2(w: torch.Tensor) -> torch.Tensor:
    """Pack ternary weights w (K, N), integer or float with values in {-1, 0, 1} and K a multiple of 4, into a
    uint8 (K // 4, N) tensor: bits 2j..2j+1 of ``packed[p, n]`` hold ``w[j * (K // 4) + p, n] + 1``."""
    if w.dim() != 2:
        raise ValueError(f"pack_int2: w must be 2-D (K, N), got shape {tuple(w.shape)}")
    if w.shape[0] % CODES_PER_BYTE:
        raise ValueError(f"pack_int2: w's first dim K must be a multiple of 4, got {w.shape[0]}")
    ternary = (w == -1) | (w == 0) | (w == 1)
    if not ternary.all():
        raise ValueError(f"pack_int2: w's values must be -1, 0 or 1, got {w[~ternary][0].item()}")
    codes = (w + 1).to(torch.uint8).reshape(CODES_PER_BYTE, w.shape[0] // CODES_PER_BYTE, w.shape[1])
    packed = codes[0].clone()
    for j in range(1, CODES_PER_BYTE):
        packed |= codes[j] << (2 * j)
    return packed


def unpack_int2(w_packed: torch.Tensor) -> torch.Tensor:
    """The ternary weights (K, N) int8 that w_packed (K // 4, N), uint8 or int8, holds (code 3, invalid, gives 2:
    what the kernel and the unpacking code the rewrite replaces compute from it)."""
    if w_packed.dtype not in PACKED_DTYPES or w_packed.dim() != 2:
        raise ValueError(f"unpack_int2: w_packed must be a 2-D uint8 or int8 tensor, got {w_packed.dtype} of shape "
                         f"{tuple(w_packed.shape)}")
    bits = w_packed.view(torch.uint8)  # logical shifts, also for int8 storage
    fields = [(bits >> (2 * j)) & 3 for j in range(CODES_PER_BYTE)]
    return torch.cat(fields, dim=0).to(torch.int8) - 1


def matmul_int2_int8_reference(x_rows: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """x_rows (M, K) int8 @ unpack_int2(w_packed), exactly, as int32 (M, N)."""
    w = unpack_int2(w_packed)
    if x_rows.device.type == "cpu":
        return x_rows.to(torch.int32) @ w.to(torch.int32)
    return (x_rows.double() @ w.double()).to(torch.int32)  # sums of at most 128 * K: exact in float64


def _check(x: torch.Tensor, w_packed: torch.Tensor) -> None:
    if x.dtype != torch.int8:
        fail(_OP, f"x must be int8 (quantized activations), got {x.dtype}")
    if w_packed.dtype not in PACKED_DTYPES:
        fail(_OP, f"w_packed must be uint8 (or int8 holding the same bits), got {w_packed.dtype}")
    if w_packed.dim() != 2:
        fail(_OP, f"w_packed must be 2-D (K // 4, N), got shape {tuple(w_packed.shape)}")
    if x.dim() == 0:
        fail(_OP, "x must have at least one dim")
    if x.shape[-1] != CODES_PER_BYTE * w_packed.shape[0]:
        fail(_OP, f"x's last dim K must be 4 * w_packed.shape[0], got x {tuple(x.shape)} and w_packed "
                  f"{tuple(w_packed.shape)}")
    check_same_device(_OP, x=x, w_packed=w_packed)


@define_op(_OP)
def _matmul_int2_int8(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    _check(x, w_packed)
    # math.prod, not reshape(-1, K): that cannot infer the rows when K is 0
    x_rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if can_launch(x):
        out = torch.empty((x_rows.shape[0], w_packed.shape[1]), dtype=torch.int32, device=x.device)
        kernels.int2_matmul(x_rows, w_packed.view(torch.uint8), out)
    else:
        out = matmul_int2_int8_reference(x_rows, w_packed)
    return out.view(*x.shape[:-1], w_packed.shape[1])


def matmul_int2_int8(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """x int8 (..., K) @ the ternary weights w_packed (K // 4, N) packs (`pack_int2`), exactly, as int32 (..., N)."""
    return torch.ops.liger.matmul_int2_int8(x, w_packed)
