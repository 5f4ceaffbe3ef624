"""Embedding lookup as a torch.library custom op (experimental).

``torch.ops.liger.embedding(ids, weight, padding_idx=None)`` = ``F.embedding(ids, weight, padding_idx)``: ids of
any shape (int32 or int64), weight (num_embeddings, dim) in fp32, fp16 or bf16; the result has shape
``ids.shape + (dim,)``. `padding_idx` as `F.embedding` takes it (None, or an index, negative counting from the
end): that row gets no gradient. Backward is ``liger::embedding_backward``, a deterministic segment sum in fp32
(see `liger_compile.kernels.embedding`); only the ids are saved for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_compile.kernels import embedding as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import as_rows, check_float_tensor, check_same_device, define_op, fail

_OP = "embedding"
ID_DTYPES = (torch.int32, torch.int64)


def _check_ids(op: str, ids: torch.Tensor) -> None:
    if ids.dtype not in ID_DTYPES:
        fail(op, f"ids must be int32 or int64, got {ids.dtype}")


def _padding_row(op: str, n_embeddings: int, padding_idx: int | None) -> int:
    """`padding_idx` as a row index, or -1 for none (the convention of the aten ops and the kernel)."""
    if padding_idx is None:
        return -1
    if not -n_embeddings <= padding_idx < n_embeddings:
        fail(op, f"padding_idx must be within [-{n_embeddings}, {n_embeddings}), got {padding_idx}")
    return padding_idx % n_embeddings


def embedding_backward_reference(dy: torch.Tensor, ids: torch.Tensor, n_embeddings: int,
                                 padding_idx: int) -> torch.Tensor:
    """What eager autograd computes for ``F.embedding``'s weight (`padding_idx` a row index, or -1)."""
    return torch.ops.aten.embedding_dense_backward(dy, ids, n_embeddings, padding_idx, False)


@define_op("embedding")
def _embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    _check_ids(_OP, ids)
    check_float_tensor(_OP, "weight", weight)
    check_same_device(_OP, ids=ids, weight=weight)
    if weight.dim() != 2:
        fail(_OP, f"weight must be 2-D (num_embeddings, dim), got shape {tuple(weight.shape)}")
    _padding_row(_OP, weight.shape[0], padding_idx)
    if not can_launch(weight):
        return F.embedding(ids, weight)
    out = torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    kernels.embedding_forward(ids.reshape(-1), as_rows(weight), out.view(-1, weight.shape[1]))
    return out


@define_op("embedding_backward")
def _embedding_backward(dy: torch.Tensor, ids: torch.Tensor, n_embeddings: int,
                        padding_idx: int | None = None) -> torch.Tensor:
    op = f"{_OP}_backward"
    _check_ids(op, ids)
    check_float_tensor(op, "dy", dy)
    check_same_device(op, dy=dy, ids=ids)
    if dy.shape[:-1] != ids.shape:
        fail(op, f"dy {tuple(dy.shape)} must be ids' shape {tuple(ids.shape)} plus the embedding dim")
    row = _padding_row(op, n_embeddings, padding_idx)
    if not can_launch(dy):
        return embedding_backward_reference(dy, ids, n_embeddings, row)
    dw = torch.zeros((n_embeddings, dy.shape[-1]), dtype=dy.dtype, device=dy.device)
    kernels.embedding_backward(as_rows(dy), ids.reshape(-1), dw, row)
    return dw


def _setup_context(ctx, inputs, output):
    ids, weight, padding_idx = inputs
    ctx.save_for_backward(ids)
    ctx.n_embeddings = weight.shape[0]
    ctx.padding_idx = padding_idx


def _backward(ctx, dy):
    (ids,) = ctx.saved_tensors
    return None, torch.ops.liger.embedding_backward(dy, ids, ctx.n_embeddings, ctx.padding_idx), None


_embedding.register_autograd(_backward, setup_context=_setup_context)


def embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding(ids, weight, padding_idx)``; differentiable in `weight`."""
    return torch.ops.liger.embedding(ids, weight, padding_idx)
