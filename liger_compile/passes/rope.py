"""Rotary position embeddings: ``x * cos + rotate_half(x) * sin`` becomes ``torch.ops.liger.rope``.

``rotate_half(x)`` is ``cat((-x2, x1), -1)`` of x's halves ``x1, x2`` along the last dim, taken by slicing
(``x[..., :d // 2]``, ``x[..., d // 2:]``), ``chunk(2, -1)`` or ``split(d // 2, -1)``; either operand order of
the sum and of each product. Partial rotary (GPT-NeoX, Phi, StableLM, GLM) is taken whole: when ``x`` is
``t[..., :r]`` and the result's only user is ``cat((result, t[..., r:]), -1)``, the op rotates ``t`` and passes
its other columns through. When two such rotations share their cos and sin (q and k of one attention), one
``liger::rope_pair`` launch does both, and the report counts them as one rewrite (variant ``q+k``). The op's
output keeps its input's memory layout, as eager's sum does in HF's operand order; where eager's is contiguous
instead, users that depend on strides get a contiguous copy.

Everything that makes the rewrite exact is checked from node meta: float dtypes, one for cos and sin, the
result's and every product's the promotion of x's and theirs (fp32 for the bf16 q and k an autocast linear makes
times HF's fp32 cos and sin); cos and sin of one shape, with last dim x's, broadcasting against x without
enlarging it; and no gradient wanted for cos or sin. A rotate_half spelled with the halves the other way round
(``cat((x2, -x1))``: the rotation by -sin) and Meta's interleaved ``view_as_complex`` form are reported, not
rewritten.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.ops.rope import MAX_DIMS, position_sizes
from liger_compile.passes.graph import (
    InexactMatch,
    Rewriter,
    canonical,
    find_matches,
    last_dim_half,
    only_user,
    reduced_dims,
    same_shape,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "rope"
_TARGET = torch.ops.liger.rope.default
_PAIR_TARGET = torch.ops.liger.rope_pair.default


@dataclass
class _Match:
    final: fx.Node  # the sum, or the cat that appends the passed-through columns
    x: fx.Node  # the tensor rotated (whole, for partial rotary)
    cos: fx.Node
    sin: fx.Node
    partial: bool
    nodes: list[fx.Node]


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    matches = find_matches(graph, record, _match_at)
    pairs = _pairs(graph, matches)
    for first, second in pairs:
        record.rewrite(first.final, "q+k" + (" partial" if first.partial else ""))
        pair = rewriter.replace_several([first.final, second.final], _PAIR_TARGET,
                                        (first.x, second.x, first.cos, first.sin), first.nodes + second.nodes)
        for rotated in list(pair.users):
            _contiguous_for_layout_readers(graph, rotated)
    paired = {id(m) for pair in pairs for m in pair}
    for match in matches:
        if id(match) not in paired:
            record.rewrite(match.final, "single" + (" partial" if match.partial else ""))
            _contiguous_for_layout_readers(
                graph, rewriter.replace(match.final, _TARGET, (match.x, match.cos, match.sin), match.nodes))


# Users that read a tensor's values (or shape) whatever its strides, and views whose own users see its layout.
_LAYOUT_FREE_USERS = {F.scaled_dot_product_attention, torch.matmul, operator.matmul, "matmul", torch.reshape,
                      "reshape", "contiguous", torch.cat, "size", "dim"}
_LAYOUT_PASSING_VIEWS = {operator.getitem, torch.transpose, "transpose", "expand", torch.unsqueeze, "unsqueeze"}


def _only_layout_free_users(node: fx.Node) -> bool:
    return all(
        user.op in ("call_function", "call_method")
        and (user.target in _LAYOUT_FREE_USERS
             or (user.target in _LAYOUT_PASSING_VIEWS and _only_layout_free_users(user)))
        for user in node.users)


def _contiguous_for_layout_readers(graph: fx.Graph, rotated: fx.Node) -> None:
    """The op's output keeps its input's memory layout. So does eager's ``x * cos + rotate_half(x) * sin`` (its
    first operand's); other spellings and partial rotary give a contiguous tensor. There, unless every use reads
    only values (attention, matmul, reshape, ...), the users get the contiguous copy eager made: a ``view`` or a
    graph output depends on the strides."""
    eager = tensor_meta(rotated)
    if eager is None or not eager.is_contiguous() or _only_layout_free_users(rotated):
        return
    with graph.inserting_after(rotated):
        copy = graph.call_method("contiguous", (rotated,))
    copy.meta.update(rotated.meta)
    rotated.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)


def _pairs(graph: fx.Graph, matches: list[_Match]) -> list[tuple[_Match, _Match]]:
    """Consecutive matches on one cos and sin (q then k) that one rope_pair launch can rotate together."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    pairs, waiting = [], {}
    for match in matches:
        key = (match.cos, match.sin)
        first = waiting.pop(key, None)
        if first is not None and _pairable(first, match, order):
            pairs.append((first, match))
        else:
            waiting[key] = match
    return pairs


def _pairable(q: _Match, k: _Match, order: dict[fx.Node, int]) -> bool:
    q_meta, k_meta, cos_meta = tensor_meta(q.x), tensor_meta(k.x), tensor_meta(q.cos)
    if q_meta.dim() != k_meta.dim() or q_meta.dtype != k_meta.dtype or q_meta.shape[-1] != k_meta.shape[-1]:
        return False
    differing = [d for d in range(q_meta.dim()) if not same_shape(q_meta.shape[d:d + 1], k_meta.shape[d:d + 1])]
    q_sizes, k_sizes = position_sizes(q_meta.shape, k_meta.shape, cos_meta.shape, differing)
    if not same_shape(q_sizes, k_sizes):
        return False
    earliest = min(order[q.final], order[k.final])
    return all(order[a] < earliest for a in (q.x, k.x, q.cos, q.sin))


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None:
        return None
    if call.op == "mul":
        _check_complex_form(call)
        return None
    if call.op != "add" or call.get("alpha", 1) != 1:
        return None
    for cos_term, sin_term in ((call["input"], call.get("other")), (call.get("other"), call["input"])):
        found = _rotation(cos_term, sin_term)
        if found is not None:
            x, cos, sin, nodes = found
            _check_exact(node, x, cos, sin, nodes)
            return _widen_to_partial(_Match(node, x, cos, sin, False, nodes + [node]))
    return None


def _products(node) -> list[tuple[fx.Node, fx.Node]]:
    """The (factor, other factor) orderings of a product of two graph values."""
    call = canonical(node)
    if call is None or call.op != "mul":
        return []
    a, b = call["input"], call.get("other")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return []
    return [(a, b), (b, a)]


def _rotation(cos_term, sin_term):
    """(x, cos, sin, nodes) when cos_term is ``x * cos`` and sin_term is ``rotate_half(x) * sin``."""
    for x, cos in _products(cos_term):
        for rotated, sin in _products(sin_term):
            halves = _rotate_half_input(rotated)
            if halves is None or halves[0] is not x:
                continue
            return x, cos, sin, [cos_term, sin_term, rotated, *halves[1]]
    return None


def _rotate_half_input(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, nodes) when `node` is ``cat((-x2, x1), -1)`` of x's halves; a near-miss for the halves the other way."""
    call = canonical(node)
    if call is None or call.op != "cat" or not isinstance(call["tensors"], (list, tuple)):
        return None
    meta = tensor_meta(node)
    parts = call["tensors"]
    if meta is None or len(parts) != 2 or reduced_dims(call.get("dim", 0), meta.dim()) != (meta.dim() - 1,):
        return None
    (negated_first, first), (negated_second, second) = (_negated(p) for p in parts)
    halves = [_half_of(first), _half_of(second)]
    if None in halves or halves[0][0] is not halves[1][0]:
        return None
    (x, first_index, first_nodes), (_, second_index, second_nodes) = halves
    nodes = [n for n in parts if isinstance(n, fx.Node)] + first_nodes + second_nodes
    if (negated_first, first_index, negated_second, second_index) == (True, 1, False, 0):
        return x, nodes
    if {first_index, second_index} == {0, 1} and negated_first != negated_second:
        raise InexactMatch("rotate_half with the halves the other way round (not cat((-x2, x1), -1)): the "
                           "rotation by -sin")
    return None


def _negated(node) -> tuple[bool, object]:
    call = canonical(node)
    if call is not None and call.op == "neg":
        return True, call["input"]
    return False, node


def _half_of(node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(x, 0 or 1, nodes) when `node` is the first or second half of x's last dim."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args
    meta = tensor_meta(source)
    if meta is not None:  # x[..., a:b]
        width = meta.shape[-1] if meta.dim() else None
        if not isinstance(width, int) or width % 2:
            return None
        bounds = _last_dim_slice(index, meta.shape)
        if bounds == (0, width // 2):
            return source, 0, [node]
        if bounds == (width // 2, width):
            return source, 1, [node]
        return None
    return last_dim_half(node)


def _last_dim_slice(index, shape) -> tuple[int, int] | None:
    """(start, stop), normalised to [0, width], when a getitem index takes a plain slice of the last dim only."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) >= 2 and index[0] is Ellipsis:
        leading = index[1:-1]
    elif len(index) == len(shape):
        leading = index[:-1]
    else:
        return None
    last, width = index[-1], shape[-1]
    if any(i != slice(None) for i in leading) or not isinstance(last, slice) or last.step not in (None, 1):
        return None
    bounds = []
    for bound, default in ((last.start, 0), (last.stop, width)):
        value = default if bound is None else bound
        if not isinstance(value, int) or not isinstance(width, int):
            return None
        bounds.append(min(max(value + width if value < 0 else value, 0), width))
    return bounds[0], bounds[1]


def _check_exact(final: fx.Node, x: fx.Node, cos: fx.Node, sin: fx.Node, nodes: list[fx.Node]) -> None:
    metas = {"x": tensor_meta(x), "cos": tensor_meta(cos), "sin": tensor_meta(sin), "result": tensor_meta(final)}
    missing = [name for name, meta in metas.items() if meta is None]
    if missing:
        raise InexactMatch(f"no tensor metadata for {', '.join(missing)}")
    x_meta, cos_meta, sin_meta = metas["x"], metas["cos"], metas["sin"]
    # x's halves are in x's dtype, products and sums in the promoted one (16-bit q and k times fp32 cos and sin,
    # under autocast); every intermediate is one of the two (a split node's value is a tuple, not a tensor)
    promoted = torch.promote_types(x_meta.dtype, cos_meta.dtype)
    dtypes = {meta.dtype for meta in map(tensor_meta, nodes) if meta is not None}
    if (x_meta.dtype not in FLOAT_DTYPES or cos_meta.dtype not in FLOAT_DTYPES or sin_meta.dtype != cos_meta.dtype
            or metas["result"].dtype != promoted or not dtypes <= {x_meta.dtype, promoted}):
        raise InexactMatch(f"dtypes differ or are not supported: x {x_meta.dtype}, cos {cos_meta.dtype}, "
                           f"sin {sin_meta.dtype}, result {metas['result'].dtype}")
    if x_meta.dim() > MAX_DIMS or cos_meta.dim() > x_meta.dim():
        raise InexactMatch(f"x has {x_meta.dim()} dims and cos {cos_meta.dim()}: the op takes at most {MAX_DIMS}")
    if not same_shape(cos_meta.shape, sin_meta.shape):
        raise InexactMatch(f"cos {tuple(cos_meta.shape)} and sin {tuple(sin_meta.shape)} differ in shape")
    if not same_shape(metas["result"].shape, x_meta.shape) or not _broadcasts_into(cos_meta.shape, x_meta.shape):
        raise InexactMatch(f"cos/sin {tuple(cos_meta.shape)} do not broadcast into x {tuple(x_meta.shape)} "
                           "along its leading dims")
    if cos_meta.requires_grad or sin_meta.requires_grad:
        raise InexactMatch("cos or sin requires grad (a learned rotation); the op gives them no gradient")
    if len({cos_meta.device, sin_meta.device, x_meta.device}) > 1:
        raise InexactMatch("x, cos and sin are on different devices")


def _broadcasts_into(small, large) -> bool:
    """`small` broadcasts to `large` with the same last dim, each leading dim 1 or equal (provably)."""
    if len(small) > len(large) or not same_shape(small[-1:], large[-1:]):
        return False
    return all(size == 1 or same_shape([size], [other]) for size, other in zip(small[-2::-1], large[-2::-1]))


def _widen_to_partial(match: _Match) -> _Match:
    """If x is ``t[..., :r]`` and the result's only user appends ``t[..., r:]``, rotate t whole."""
    x_call_ok = match.x.op == "call_function" and match.x.target is operator.getitem
    cat = only_user(match.final)
    cat_call = canonical(cat)
    if not x_call_ok or cat_call is None or cat_call.op != "cat":
        return match
    source, index = match.x.args
    source_meta, cat_meta = tensor_meta(source), tensor_meta(cat)
    if source_meta is None or cat_meta is None or not isinstance(source_meta.shape[-1], int):
        return match
    rotary_dim = tensor_meta(match.x).shape[-1]
    parts = cat_call["tensors"]
    if (_last_dim_slice(index, source_meta.shape) != (0, rotary_dim) or not isinstance(parts, (list, tuple))
            or len(parts) != 2 or parts[0] is not match.final
            or reduced_dims(cat_call.get("dim", 0), cat_meta.dim()) != (cat_meta.dim() - 1,)):
        return match
    passed = parts[1]
    if not (isinstance(passed, fx.Node) and passed.op == "call_function" and passed.target is operator.getitem
            and passed.args[0] is source):
        return match
    if (_last_dim_slice(passed.args[1], source_meta.shape) != (rotary_dim, source_meta.shape[-1])
            or cat_meta.dtype != torch.promote_types(source_meta.dtype, tensor_meta(match.final).dtype)):
        return match
    return _Match(cat, source, match.cos, match.sin, True, match.nodes + [cat, passed, match.x])


def _check_complex_form(call) -> None:
    for operand in (call["input"], call.get("other")):
        if isinstance(operand, fx.Node) and operand.target is torch.view_as_complex:
            raise InexactMatch("interleaved RoPE by complex multiplication (view_as_complex): no kernel for the "
                               "interleaved layout")
