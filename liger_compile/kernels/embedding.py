"""Embedding lookup: a Triton gather forward and a deterministic segment-sum backward, with their launchers.

Forward copies ``weight[ids]`` row by row; for an id outside ``[0, num_embeddings)`` it carries a device
assertion, as eager's CUDA gather does (a compare per id, no host sync). Where the assertion is compiled out (the
interpreter) such an id reads nothing either: its row is NaN, never another row's values.

Backward is the sum, per vocabulary row, of the output-gradient rows whose id it is. The ids are sorted (stably)
once, so each id's rows form one segment of the sorted order; the program at a segment's first position sums
that segment in fp32 in sorted order and writes the row once, rounded to the weight's dtype. Other positions do
nothing, and rows no id names keep the zeros the launcher allocated. No atomics: the result is the same bits on
every run, where a scatter-add with atomics (Inductor's lowering) sums in arrival order into an fp32 buffer twice
the gradient's size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liger_compile.kernels._launch import INTERPRETING, traceable

# Launch parameters, read at each launch (benchmarks/tune_embedding.py sweeps them). Forward: a tile of ids ×
# columns per program. Backward: columns per program, and the rows of a segment summed per step (an id that
# occurs once is one row; a frequent one, a padding or common token, takes len / BACKWARD_BLOCK_M steps in its
# program, not len).
FORWARD_BLOCK_M, FORWARD_BLOCK_N, FORWARD_WARPS = 8, 1024, 4
BACKWARD_BLOCK_M, BACKWARD_BLOCK_N, BACKWARD_WARPS = 16, 2048, 4
# Under the interpreter, narrower columns: more programs, each checked, in less time.
_INTERPRETER_BLOCK_N = 128


@triton.jit(debug=True)  # keeps the bounds assertion, which Triton drops otherwise
def _embedding_forward_kernel(IDS, W, Y, n_ids, n_embeddings, n_cols, stride_w, stride_y,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_ids
    ids = tl.load(IDS + rows, mask=row_mask, other=0).to(tl.int64)
    in_range = (ids >= 0) & (ids < n_embeddings)
    tl.device_assert(in_range | ~row_mask, "liger::embedding: an id is out of range")
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    # where the assertion is compiled out (the interpreter), an out-of-range id reads nothing and gives NaN
    values = tl.load(W + ids[:, None] * stride_w + cols[None, :], mask=mask & in_range[:, None], other=float("nan"))
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], values, mask=mask)


@triton.jit
def _embedding_backward_kernel(SORTED_IDS, ORDER, SEGMENT_END, DY, DW, n_cols, stride_dy, stride_dw, padding_idx,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    position = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    row = tl.load(SORTED_IDS + position)
    previous = tl.load(SORTED_IDS + tl.maximum(position - 1, 0))
    leads = ((position == 0) | (previous != row)) & (row != padding_idx)
    # only a segment's first position sums it; elsewhere the loop is empty and the store masked off
    end = tl.where(leads, tl.load(SEGMENT_END + position), position)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if end - position == 1:  # most ids occur once: one row, without a mostly masked tile
        source = tl.load(ORDER + position).to(tl.int64)
        total = tl.load(DY + source * stride_dy + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        for start in range(position, end, BLOCK_M):
            offsets = start + tl.arange(0, BLOCK_M)
            in_segment = offsets < end
            sources = tl.load(ORDER + offsets, mask=in_segment, other=0).to(tl.int64)
            tile = tl.load(DY + sources[:, None] * stride_dy + cols[None, :],
                           mask=in_segment[:, None] & col_mask[None, :], other=0.0)
            total += tl.sum(tile.to(tl.float32), axis=0)
    stored = cols < tl.where(leads, n_cols, 0)
    tl.store(DW + row.to(tl.int64) * stride_dw + cols, total.to(DW.dtype.element_ty), mask=stored)


def _block_n(n_cols: int, block_n: int) -> int:
    return min(_INTERPRETER_BLOCK_N if INTERPRETING else block_n, triton.next_power_of_2(n_cols))


def embedding_forward(ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = weight[ids[i]] for 1-D `ids` (int32 or int64), 2-D `weight` and `out` with unit column stride."""
    n_ids, n_cols = ids.shape[0], int(weight.shape[1])
    if n_ids == 0 or n_cols == 0:  # an empty grid is not a valid launch
        return
    block_n = _block_n(n_cols, FORWARD_BLOCK_N)
    grid = (triton.cdiv(n_ids, FORWARD_BLOCK_M), triton.cdiv(n_cols, block_n))
    traceable(_embedding_forward_kernel)[grid](ids, weight, out, n_ids, weight.shape[0], n_cols, weight.stride(0),
                                               out.stride(0), BLOCK_M=FORWARD_BLOCK_M, BLOCK_N=block_n,
                                               num_warps=FORWARD_WARPS)


def embedding_backward(dy: torch.Tensor, ids: torch.Tensor, dw: torch.Tensor, padding_idx: int) -> None:
    """Add each row of `dy` (n, H) into row ``ids[i]`` of the zero-initialised `dw` (V, H), except rows of
    `padding_idx` (-1: none); deterministic. `ids` is 1-D, `dy` and `dw` have unit column stride."""
    n_ids, n_cols = ids.shape[0], int(dw.shape[1])
    if n_ids == 0 or n_cols == 0:
        return
    sorted_ids, order = torch.sort(ids, stable=True)
    segment_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    block_n = _block_n(n_cols, BACKWARD_BLOCK_N)
    grid = (n_ids, triton.cdiv(n_cols, block_n))
    traceable(_embedding_backward_kernel)[grid](sorted_ids, order, segment_end, dy, dw, n_cols, dy.stride(0),
                                                dw.stride(0), padding_idx, BLOCK_M=BACKWARD_BLOCK_M,
                                                BLOCK_N=block_n, num_warps=BACKWARD_WARPS)
