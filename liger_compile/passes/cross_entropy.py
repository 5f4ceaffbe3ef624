"""Cross-entropy on logits: ``F.cross_entropy`` becomes ``liger::cross_entropy``, or, when the logits come from
a linear layer and nothing else reads them, ``liger::fused_linear_cross_entropy``, so they never exist whole.

From the cross-entropy's (N, V) input the matcher walks back through what HF's ``ForCausalLMLoss`` and
hand-written losses put between the lm_head and the loss, taking into the op each step whose value nothing
else reads:

- ``view(-1, V)`` / ``reshape`` / ``flatten`` that merge the leading dims (rows stay rows), ``.contiguous()``;
- one row selection on the N-D logits, e.g. ``logits[..., :-1, :]`` (the older HF shift) or ``logits[:, :-1]``,
  whose last-dim index is a full slice or absent;
- ``.float()`` / ``.to(float32)`` of lower-precision logits (the op computes in fp32 anyway);
- final-logit softcapping ``tanh(x / c) * c`` (Gemma 2 and 3), in the logits' own dtype;
- the ``F.linear`` (``nn.Linear``) that made the logits: the fused path; with a logit scale ``linear(x) / c`` or
  ``linear(x) * c`` (Granite, Cohere) when c is a power of two, which the fused op takes as ``linear(x / c)``:
  scaling by a power of two is exact, so the scaled sum of products rounds to the same logits (barring
  subnormal values, far below anything a row's logits add up to). Other scales leave the logits unfused.

Labels are taken as they reach the loss (HF's ``F.pad`` and ``[..., 1:]`` shift stays in the graph); so is
anything after the loss (``/ num_items_in_batch``). ``weight``, ``ignore_index``, ``reduction`` and
``label_smoothing`` must be constants or graph values the op takes as they are; legacy ``size_average`` /
``reduce``, class-probability targets and a class dim other than the last are reported, not rewritten.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.ops.cross_entropy import REDUCTIONS
from liger_compile.passes.graph import (
    Call,
    InexactMatch,
    Rewriter,
    autocast_explicitly,
    canonical,
    derived,
    dtype_of,
    find_matches,
    number,
    only_user,
    same_shape,
    scalar_and_tensor,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "cross_entropy"
_TARGET = torch.ops.liger.cross_entropy.default
_FUSED_TARGET = torch.ops.liger.fused_linear_cross_entropy.default
_RESHAPE_METHODS = ("view", "reshape", "flatten")


@dataclass
class _Match:
    loss: fx.Node  # the F.cross_entropy call
    source: fx.Node  # the logits as the op takes them (N-D, any float dtype), or the linear's input if fused
    row_select: tuple | None  # a getitem index taken on the logits' leading dims
    target: fx.Node
    class_weight: fx.Node | None
    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    linear: tuple[fx.Node, fx.Node | None] | None  # (weight, bias) of the fused linear
    why_not_fused: str
    nodes: list[fx.Node] = field(default_factory=list)  # the loss and every node absorbed into it
    linear_dtype: torch.dtype | None = None  # what the fused linear computed in (autocast's, if it was on)
    logit_scale: tuple | None = None  # (torch.div or torch.mul, a power of two) applied to the linear's output


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        softcap = "" if match.softcap is None else " softcap"
        if match.linear is not None:
            record.rewrite(match.loss, f"fused linear{softcap}")
        else:
            record.rewrite(match.loss, f"logits{softcap} ({match.why_not_fused})")
        _replace(graph, rewriter, match)


def _replace(graph: fx.Graph, rewriter: Rewriter, match: _Match) -> None:
    options = (match.ignore_index, match.reduction, match.label_smoothing, 0.0, match.softcap)
    with graph.inserting_before(match.loss):
        rows = match.source
        if match.row_select is not None:
            rows = derived(graph, operator.getitem, (rows, match.row_select))
        rows = derived(graph, torch.reshape, (rows, (-1, tensor_meta(match.source).shape[-1])))
    if match.linear is None:
        args = (rows, match.target, match.class_weight, *options)
        target = _TARGET
    else:
        with graph.inserting_before(match.loss):
            rows, weight, bias = autocast_explicitly(graph, [rows, *match.linear], match.linear_dtype)
            if match.logit_scale is not None:
                scale, constant = match.logit_scale
                rows = derived(graph, scale, (rows, constant))
                bias = bias if bias is None else derived(graph, scale, (bias, constant))
        args = (rows, weight, bias, match.target, match.class_weight, *options)
        target = _FUSED_TARGET
    new = rewriter.replace(match.loss, target, args, match.nodes)
    loss_meta = tensor_meta(new)
    if loss_meta is not None and loss_meta.dtype != torch.float32:
        # F.cross_entropy on lower-precision logits returns their dtype; the op's loss is fp32.
        with graph.inserting_after(new):
            cast = graph.call_method("to", (new, loss_meta.dtype))
        new.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        cast.meta.update(new.meta)
        new.meta["example_value"] = loss_meta.float()


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None or call.op != "cross_entropy":
        return None
    logits, target = call["input"], call.get("target")
    logits_meta, target_meta = tensor_meta(logits), tensor_meta(target)
    if logits_meta is None or target_meta is None:
        raise InexactMatch("no tensor metadata for the logits or the target")
    if target_meta.dtype.is_floating_point:
        raise InexactMatch("the target holds class probabilities; the op takes class indices")
    if logits_meta.dim() != 2 or target_meta.dim() != 1:
        raise InexactMatch(f"logits {tuple(logits_meta.shape)} are not (rows, classes) with the class dim last")
    if logits_meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"logits dtype {logits_meta.dtype} is not supported")
    if call.get("size_average") is not None or call.get("reduce") is not None:
        raise InexactMatch("legacy size_average / reduce arguments")
    reduction, ignore_index = call.get("reduction", "mean"), call.get("ignore_index", -100)
    label_smoothing = number(call.get("label_smoothing", 0.0))
    if reduction not in REDUCTIONS or not isinstance(ignore_index, int) or label_smoothing is None:
        raise InexactMatch("reduction, ignore_index or label_smoothing is not a constant")
    class_weight = call.get("weight")
    if class_weight is not None:
        weight_meta = tensor_meta(class_weight)
        if weight_meta is None or weight_meta.requires_grad:
            raise InexactMatch("class weights that need a gradient")
    match = _Match(node, logits, None, target, class_weight, ignore_index, reduction, label_smoothing, None, None,
                   "", [node])
    _absorb_producers(match, logits)
    return match


def _not_a_linear_layer(node: fx.Node, call: Call | None, after_softcap: bool) -> str:
    """Why the fused op cannot take the logits' producer `node` (`call`: its canonical op, if any)."""
    if after_softcap and call is not None and call.op == "cast":
        return "the logits are cast before the softcap (the fused op's softcap rounds in the logits' dtype)"
    scaled = _scaled(node, call)
    if scaled is not None and getattr(canonical(scaled[0]), "op", None) == "linear":
        how = "divided by" if scaled[1] is torch.div else "times"
        if not _power_of_two(scaled[2]):
            return (f"logits made by a linear layer {how} {scaled[2]:g} (a logit scale, as in Granite and Cohere): "
                    "the fused op takes a power-of-two scale only, the one it can move onto its input exactly")
        return (f"logits made by a linear layer {how} {scaled[2]:g}: the linear's output is read elsewhere, or "
                "its shapes or dtypes do not fit the fused op")
    made_by = call.op if call is not None else getattr(node.target, "__name__", str(node.target))
    return f"logits not made by a linear layer (made by {made_by})"


def _absorb_producers(match: _Match, logits: fx.Node) -> None:
    """Walk back from the (N, V) logits, taking each step nothing else reads into `match`."""
    node, user = logits, match.loss
    merged_rows = cast = False
    while True:
        if not isinstance(node, fx.Node) or only_user(node) is not user:
            match.why_not_fused = "the logits are also used elsewhere, e.g. returned"
            break
        if node.op == "placeholder":
            match.why_not_fused = ("the logits are an input of this graph: what made them is in another one (a "
                                   "graph break, a DDP bucket or an FSDP module boundary)")
            break
        call = canonical(node)
        softcap = _softcap(node) if match.softcap is None else None
        step = None
        if call is not None and call.op == "contiguous":
            step = call["input"]
        elif _merges_rows(node) and not merged_rows and match.row_select is None:
            step, merged_rows = node.args[0], True
        elif _selects_rows(node) and match.row_select is None:
            step, match.row_select = node.args[0], node.args[1]
        elif call is not None and call.op == "cast" and not cast and match.softcap is None and _upcast(node):
            step, cast = call["input"], True
        elif softcap is not None:
            step, match.softcap, (tanh, division) = softcap
            match.nodes.extend([node, tanh])
            node = division  # the softcap's first node: what `step` must feed alone
        elif call is not None and call.op == "linear":
            if _take_linear(match, node, call):
                return
            match.why_not_fused = "the linear layer's shapes or dtypes do not fit the fused op"
            break
        elif (scale := _logit_scale(node, call)) is not None and _take_linear(match, scale[0], canonical(scale[0])):
            match.nodes.append(node)
            match.logit_scale = scale[1:]
            return
        if step is None:
            match.why_not_fused = _not_a_linear_layer(node, call, match.softcap is not None)
            break
        match.nodes.append(node)
        node, user = step, node
    match.source = node


def _merges_rows(node: fx.Node) -> bool:
    """A reshape of (..., V) to (N, V): each output row is one input row, in order."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in (torch.reshape, torch.flatten))
    if not is_reshape or not node.args:
        return False
    source, result = tensor_meta(node.args[0]), tensor_meta(node)
    return (source is not None and result is not None and source.dim() >= 2 and result.dim() == 2
            and same_shape(source.shape[-1:], result.shape[-1:]))


def _selects_rows(node: fx.Node) -> bool:
    """``x[index]`` with basic indexing that keeps x's last dim whole and its dim count (rows selected only)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, result = tensor_meta(node.args[0]), tensor_meta(node)
    index = node.args[1]
    if source is None or result is None or not isinstance(index, tuple) or not index:
        return False
    basic = all(isinstance(i, slice) or i is Ellipsis for i in index)
    # the last dim is whole if indexed by ``:``, or not indexed at all (``logits[:, :-1]`` of 3-D logits)
    full_last = (index[-1] == slice(None) and (Ellipsis in index or len(index) == source.dim())) or (
        Ellipsis not in index and len(index) < source.dim())
    return basic and full_last and result.dim() == source.dim()


def _take_linear(match: _Match, node: fx.Node, call: Call) -> bool:
    """Takes the linear `node` into `match` as the fused op's matmul, if the op can compute it."""
    if node.kwargs.get("out") is not None or not _fusable_linear(match, call, node):
        return False
    match.nodes.append(node)
    match.source = call["input"]
    match.linear = (call["weight"], call.get("bias"))
    match.linear_dtype = dtype_of(node)
    return True


def _scaled(node: fx.Node, call: Call | None) -> tuple[fx.Node, object, float] | None:
    """(x, torch.div or torch.mul, c) when `node` is ``x / c`` or ``x * c`` (``c * x``) for a number c."""
    if call is not None and call.op == "div" and number(call.get("other")) is not None \
            and call.get("rounding_mode") is None:
        return call["input"], torch.div, number(call["other"])
    product = scalar_and_tensor(node, "mul")
    return None if product is None else (product[1], torch.mul, product[0])


def _power_of_two(value: float) -> bool:
    return math.isfinite(value) and value != 0 and math.frexp(abs(value))[0] == 0.5


def _logit_scale(node: fx.Node, call: Call | None) -> tuple[fx.Node, object, float] | None:
    """`_scaled`'s (x, scale, c) when `node` scales the output of a linear layer, read by nothing else, by a power
    of two c, in the linear's dtype."""
    scaled = _scaled(node, call)
    if scaled is None or not _power_of_two(scaled[2]) or only_user(scaled[0]) is not node:
        return None
    linear = canonical(scaled[0])
    if linear is None or linear.op != "linear" or dtype_of(node) != dtype_of(scaled[0]):
        return None
    return scaled


def _upcast(node: fx.Node) -> bool:
    source, result = tensor_meta(node.args[0]), tensor_meta(node)
    return source is not None and source.dtype in FLOAT_DTYPES and result.dtype == torch.float32


def _softcap(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """(x, c, (the tanh, the division)) when `node` is ``tanh(x / c) * c`` in x's dtype."""
    call = canonical(node)
    if call is None or call.op != "mul":
        return None
    for tanh, cap in ((call["input"], call.get("other")), (call.get("other"), call["input"])):
        tanh_call = canonical(tanh)
        if number(cap) is None or tanh_call is None or tanh_call.op != "tanh" or only_user(tanh) is not node:
            continue
        division = tanh_call["input"]
        division_call = canonical(division)
        if (division_call is None or division_call.op != "div" or number(division_call.get("other")) != number(cap)
                or division_call.get("rounding_mode") is not None or only_user(division) is not tanh):
            continue
        x = division_call["input"]
        dtypes = {getattr(tensor_meta(n), "dtype", None) for n in (x, division, tanh, node)}
        if len(dtypes) == 1 and number(cap) > 0:
            return x, number(cap), (tanh, division)
    return None


def _fusable_linear(match: _Match, call, node: fx.Node) -> bool:
    hidden, weight, bias = (tensor_meta(call.get(name)) for name in ("input", "weight", "bias"))
    if hidden is None or weight is None or (call.get("bias") is not None and bias is None):
        return False
    if dtype_of(node) not in FLOAT_DTYPES:
        return False
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    return (weight.dim() == 2 and hidden.dim() >= 1 and same_shape(hidden.shape[-1:], weight.shape[1:])
            and (bias is None or bias.dim() == 1) and len({t.dtype for t in tensors}) == 1
            and hidden.dtype in FLOAT_DTYPES and len({t.device for t in tensors}) == 1)
