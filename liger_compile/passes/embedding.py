"""Embedding lookups: ``F.embedding`` (``nn.Embedding``) and ``torch.embedding`` become ``torch.ops.liger.embedding``.

Exact when the lookup is a plain gather: integer ids, a 2-D float weight, and none of the options that change
the computation (``max_norm`` renormalises the looked-up rows of the weight in place; ``scale_grad_by_freq``
scales the gradient by each id's count; ``sparse`` makes it a sparse tensor). Lookups with those are left
alone and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.ops.embedding import ID_DTYPES
from liger_compile.passes.graph import InexactMatch, Rewriter, find_matches, tensor_meta
from liger_compile.passes.manager import Recorder

FAMILY = "embedding"
_TARGET = torch.ops.liger.embedding.default

# Each spelling's parameters, in order.
_SPELLINGS = {
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    torch.embedding: ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
}
# Options that change the lookup or its gradient unless left at these values (their defaults).
_PLAIN_OPTIONS = {"max_norm": None, "scale_grad_by_freq": False, "sparse": False}
_DEFAULTS = {"padding_idx": None, **_PLAIN_OPTIONS}


@dataclass
class _Match:
    node: fx.Node
    ids: fx.Node
    weight: fx.Node
    padding_idx: int | None
    variant: str

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.node]


def _match_at(node: fx.Node) -> _Match | None:
    if node.op != "call_function" or node.target not in _SPELLINGS:
        return None
    params = {**_DEFAULTS, **dict(zip(_SPELLINGS[node.target], node.args)), **node.kwargs}
    for option, plain in _PLAIN_OPTIONS.items():
        if params[option] is not plain:
            raise InexactMatch(f"{option}={params[option]!r} changes the lookup or its gradient; the op computes "
                               "a plain gather")
    ids, weight, padding_idx = params["input"], params["weight"], params["padding_idx"]
    ids_meta, weight_meta = tensor_meta(ids), tensor_meta(weight)
    if ids_meta is None or weight_meta is None:
        raise InexactMatch("no tensor metadata for the ids or the weight")
    if ids_meta.dtype not in ID_DTYPES:
        raise InexactMatch(f"ids of dtype {ids_meta.dtype}; the op takes int32 or int64")
    if weight_meta.dim() != 2 or weight_meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"weight {tuple(weight_meta.shape)} of {weight_meta.dtype}; the op takes a 2-D fp32, "
                           "fp16 or bf16 weight")
    if ids_meta.device != weight_meta.device:
        raise InexactMatch("ids and weight are on different devices")
    if not (padding_idx is None or isinstance(padding_idx, int)):
        raise InexactMatch(f"padding_idx {padding_idx!r} is not a constant")
    if node.target is torch.embedding and padding_idx is not None and padding_idx < 0:
        padding_idx = None  # aten's convention: a negative index means none (F.embedding counts from the end)
    variant = "F.embedding" if node.target is F.embedding else "torch.embedding"
    return _Match(node, ids, weight, padding_idx, variant + (" padding_idx" if padding_idx is not None else ""))


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        record.rewrite(match.node, match.variant)
        rewriter.replace(match.node, _TARGET, (match.ids, match.weight, match.padding_idx), match.nodes)
