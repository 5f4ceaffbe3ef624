"""Residual add + norm: ``h = a + b; y = norm(h)`` becomes one ``liger::add_rms_norm`` / ``add_layer_norm``.

Runs after the norm families, on the ``liger::rms_norm`` / ``liger::layer_norm`` calls they made: where a
norm's input is the sum of two tensors of its shape and dtype (a pre-norm block's residual stream), the fused op
reads both once and writes h and y; its backward adds h's own gradient to the norm's input gradient in the same
pass. Other uses of h read the fused op's h. Sums that broadcast or promote are near-misses (the kernel adds
two tensors of one dtype elementwise).
"""

from __future__ import annotations

import torch
from torch import fx

from liger_compile.passes.graph import Rewriter, canonical, same_shape, tensor_meta
from liger_compile.passes.manager import Recorder

FAMILY = "residual_norm"
_FUSED = {
    torch.ops.liger.rms_norm.default: (torch.ops.liger.add_rms_norm.default, "add + rms_norm"),
    torch.ops.liger.layer_norm.default: (torch.ops.liger.add_layer_norm.default, "add + layer_norm"),
}


def apply(graph: fx.Graph, record: Recorder) -> None:
    for norm in [n for n in graph.nodes if n.op == "call_function" and n.target in _FUSED]:
        operands = _summands(norm, record)
        if operands is not None:
            _fuse(graph, norm, *operands, record)


def _summands(norm: fx.Node, record: Recorder) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when the norm's input is a + b, two tensors of its shape and dtype; None otherwise."""
    h = norm.args[0]
    call = canonical(h)
    if call is None or call.op != "add" or call.get("alpha", 1) != 1:
        return None
    a, b = call["input"], call.get("other")
    metas = [tensor_meta(a), tensor_meta(b), tensor_meta(h)]
    if any(m is None for m in metas):
        return None  # a scalar added: not a residual stream
    ma, mb, mh = metas
    if not (same_shape(ma.shape, mh.shape) and same_shape(mb.shape, mh.shape)):
        record.near_miss(h, f"the sum broadcasts ({tuple(ma.shape)} + {tuple(mb.shape)}): not fused with its norm")
        return None
    if not ma.dtype == mb.dtype == mh.dtype:
        record.near_miss(h, f"the sum promotes ({ma.dtype} + {mb.dtype}): not fused with its norm")
        return None
    return a, b


def _fuse(graph: fx.Graph, norm: fx.Node, a: fx.Node, b: fx.Node, record: Recorder) -> None:
    h = norm.args[0]
    order = {node: i for i, node in enumerate(graph.nodes)}
    # The fused op goes after the sum and everything the norm takes (a weight may be computed after the sum);
    # every other reader of h must come after that.
    anchor = max([h, *(arg for arg in norm.args[1:] if isinstance(arg, fx.Node))], key=order.__getitem__)
    if any(order[user] <= order[anchor] for user in h.users if user is not norm):
        return  # h is read before the norm's weight exists: left as it is (rare; not an inexact rewrite)
    target, variant = _FUSED[norm.target]
    record.rewrite(norm, variant)
    Rewriter(graph).replace_several([norm, h], target, (a, b, *norm.args[1:]), [norm, h])
