"""Attention calls handed to ``F.scaled_dot_product_attention`` in a form that keeps it off its fast kernels.

Two rewrites of the call's arguments; the attention itself stays PyTorch's:

- **causal mask → ``is_causal=True``**: a boolean ``attn_mask`` built as ``kv_index <= q_index`` from two
  ``arange``s from 0 (HF's ``sdpa_mask`` under ``torch.compile`` on torch < 2.14, hand-written models) is the
  causal mask that ``is_causal=True`` means, ``j <= i``, whatever the batch and head broadcasting. With the mask
  spelled out, the fused kernels attend to every key (twice the work) and read the mask; with ``is_causal`` they
  skip the masked half.
- **repeated keys and values → ``enable_gqa=True``**: ``k[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv * n,
  T, D)`` (HF's ``repeat_kv``) or ``repeat_interleave(n, dim=1)`` of both k and v becomes the un-repeated k and v
  with ``enable_gqa=True``, which gives query head h key head ``h // n``: the same values without the copies,
  which autograd also saves for the backward. Only without a mask, as transformers itself does: with one, CUDA
  attention falls back to its math kernel (so that case is left as it is, and not reported: nothing inexact).

A mask compared from index ranges that is not provably causal (an offset, a strict ``<``, the operands swapped)
is left alone and reported. A mask computed from constants alone by other deterministic ops (HF's mask for
packed sequences, which transformers builds when no cache is in use, e.g. under gradient checkpointing: positions
``arange``d, compared within a batch row and ``&``-ed with the causal comparison) is evaluated, on the CPU, and
rewritten where every element equals the causal mask's. Inside an activation-checkpointed layer the mask is an
input of the region, built once outside it: the rewrite follows it there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from liger_compile.passes.graph import InexactMatch, erase_unused, find_matches, outside, same_shape, tensor_meta
from liger_compile.passes.manager import Recorder

FAMILY = "attention"

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_LESS_EQUAL = {operator.le, torch.le, "le"}  # a <= b
_GREATER_EQUAL = {operator.ge, torch.ge, "ge"}  # a >= b
_COMPARISONS = {operator.lt, operator.gt, torch.lt, torch.gt, "lt", "gt"} | _LESS_EQUAL | _GREATER_EQUAL

# Deterministic ops a mask made from constants may go through to be evaluated (no uninitialised memory, no
# randomness, no data from outside the graph), and the most elements any step may have.
_EVALUABLE = {
    torch.arange, torch.ones, torch.zeros, torch.full, torch.diff, torch.cumsum, torch.tril, torch.triu,
    torch.where, torch.logical_and, torch.logical_or, torch.logical_not, operator.add, operator.sub,
    operator.getitem, operator.eq, operator.ne, operator.and_, operator.or_, operator.invert, torch.eq, torch.ne,
    "unsqueeze", "expand", "view", "reshape", "to", "cumsum", "diff", "new_ones", "new_zeros", "eq", "ne",
    "logical_and", "logical_or", "logical_not", "tril", "triu", "bool", "long", "int",
    # how some torch versions' Dynamo records ==, !=, &, | and ~ between tensors (torch 2.11: ``__eq__``)
    "__eq__", "__ne__", "__le__", "__lt__", "__ge__", "__gt__", "__and__", "__or__", "__invert__",
} | _COMPARISONS
# Ops whose float results can round differently on the model's device than on the CPU (a float cumsum's rounding
# depends on its summation order): evaluated on integers and booleans only. The others (constructors, casts,
# views, comparisons, selections) give every dtype's values exactly.
_ROUNDING = {torch.arange, torch.diff, torch.cumsum, operator.add, operator.sub, "cumsum", "diff"}
_EXACT_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
_MAX_EVALUATED_ELEMENTS = 2**30  # batch 8 of 8192 positions: (8, 1, 8192, 8192) booleans, 0.5 GiB


@dataclass
class _Match:
    node: fx.Node
    causal_mask: list[fx.Node] | None  # the mask's nodes, where the mask is the causal one
    grouped: tuple[fx.Node, fx.Node, list[fx.Node]] | None  # un-repeated key and value, the repeats' nodes

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.node]


def _target(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's operands by name; a method's ``self`` is the first name."""
    return {**dict(zip(names, node.args)), **node.kwargs}


def _position_range(node) -> tuple[list[fx.Node], bool] | None:
    """(nodes, from_zero) when `node` is an integer ``arange`` plus maybe a number, reshaped by views and by size-1
    dims added (indexing with None, unsqueeze): its elements in row-major order are the range's. `from_zero`: it
    is ``arange(n)`` itself, start 0, step 1, nothing added. None for anything else."""
    meta = tensor_meta(node)
    if meta is None or meta.dtype.is_floating_point or meta.dtype == torch.bool:
        return None
    nodes, from_zero = [], True
    while isinstance(node, fx.Node):
        nodes.append(node)
        target = _target(node)
        if target is operator.getitem and isinstance(node.args[1], tuple) and all(
                i is None or i == slice(None) for i in node.args[1]):
            node = node.args[0]
        elif target in (torch.unsqueeze, "unsqueeze", "view", "reshape", torch.reshape):
            node = node.args[0]
        elif target in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if len(tensors) != 1 or len(numbers) != 1:
                return None
            from_zero &= numbers[0] == 0
            node = tensors[0]
        elif target is torch.arange:
            params = ({"end": node.args[0]} if len(node.args) == 1 else dict(zip(("start", "end", "step"),
                                                                                  node.args))) | node.kwargs
            from_zero &= params.get("start", 0) == 0 and params.get("step", 1) == 1
            return nodes, from_zero
        else:
            return None
    return None


def _along(node: fx.Node, length, dim: int) -> bool:
    """`node`'s shape is all ones but `length` at `dim` (negative)."""
    shape = tensor_meta(node).shape
    return len(shape) >= -dim and same_shape(shape, [length if d == len(shape) + dim else 1 for d in range(len(shape))])


def _causal_mask(mask, q_length, kv_length) -> list[fx.Node] | None:
    """The nodes of `mask` when it is ``kv_index <= q_index`` (or ``q_index >= kv_index``), the positions
    ``arange``s from 0 along the mask's last and second-last dims, maybe expanded; None when it is not a
    comparison of position ranges; `InexactMatch` when it is one but not provably the causal mask. A mask handed
    into a checkpointed region is read where it was built (its nodes there stay: the region's call reads them)."""
    nodes, mask = [], outside(mask)
    while isinstance(mask, fx.Node) and _target(mask) in ("expand", torch.Tensor.expand):
        nodes.append(mask)
        mask = mask.args[0]
    if not isinstance(mask, fx.Node) or _target(mask) not in _COMPARISONS or len(mask.args) != 2:
        return _evaluated_causal(mask, q_length, kv_length)
    target, (left, right) = _target(mask), mask.args
    ranges = [_position_range(side) for side in (left, right)]
    if None in ranges:
        return _evaluated_causal(mask, q_length, kv_length)
    if not all(from_zero for _, from_zero in ranges):
        raise InexactMatch("the mask compares positions that are not arange(length) from 0 (an offset or a step): "
                           "not provably the causal mask")
    kv, q = (left, right) if target in _LESS_EQUAL else (right, left)
    if target not in _LESS_EQUAL | _GREATER_EQUAL or not (_along(kv, kv_length, -1) and _along(q, q_length, -2)):
        name = getattr(target, "__name__", target)
        raise InexactMatch(f"the mask compares query and key positions with {name} in an order that is not "
                           "key <= query: not the causal mask")
    return nodes + [mask] + ranges[0][0] + ranges[1][0]


def _evaluated_causal(mask, q_length, kv_length) -> list[fx.Node] | None:
    """The nodes of `mask` when it is computed from constants alone through `_EVALUABLE` ops with static shapes
    (`_ROUNDING` ones on integers and booleans) and, evaluated on the CPU, is True exactly where the key's position
    is at most the query's (its last two dims the query's and the key's length); None otherwise."""
    if not isinstance(mask, fx.Node) or not isinstance(q_length, int) or not isinstance(kv_length, int):
        return None
    nodes, pending = set(), [mask]
    while pending:
        node = pending.pop()
        if node in nodes:
            continue
        meta = tensor_meta(node)
        if (_target(node) not in _EVALUABLE or meta is None or not all(isinstance(d, int) for d in meta.shape)
                or meta.numel() > _MAX_EVALUATED_ELEMENTS
                or (_target(node) in _ROUNDING and meta.dtype not in _EXACT_DTYPES)):
            return None
        nodes.add(node)
        pending.extend(node.all_input_nodes)
    values: dict[fx.Node, object] = {}

    def value(arg):
        if isinstance(arg, fx.Node):
            return values[arg]
        if isinstance(arg, torch.device):
            return torch.device("cpu")  # the same values on any device (see _ROUNDING)
        if isinstance(arg, (tuple, list)):
            return type(arg)(value(a) for a in arg)
        return arg

    for node in mask.graph.nodes:  # graph order: operands first
        if node not in nodes:
            continue
        args, kwargs = value(node.args), {k: value(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            values[node] = node.target(*args, **kwargs)
    result = values[mask]
    if not (isinstance(result, torch.Tensor) and result.dtype == torch.bool and result.dim() >= 2
            and tuple(result.shape[-2:]) == (q_length, kv_length)):
        return None
    causal = torch.ones(q_length, kv_length, dtype=torch.bool).tril()
    return [node for node in mask.graph.nodes if node in nodes] if bool((result == causal).all()) else None


def _repeated_heads(node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(x, n, nodes) when `node` is 4-D ``x`` with each head repeated n times in place (head h of the result is
    head h // n of x): ``x[:, :, None].expand(B, H, n, T, D).reshape(B, H * n, T, D)`` or
    ``x.repeat_interleave(n, dim=1)``."""
    meta = tensor_meta(node)
    if meta is None or meta.dim() != 4:
        return None
    target = _target(node)
    if target in ("repeat_interleave", torch.repeat_interleave):
        params = _args(node, ("input", "repeats", "dim"))
        x, repeats = params.get("input"), params.get("repeats")
        if isinstance(repeats, int) and params.get("dim") in (1, -3) and params.get("output_size") is None:
            return x, repeats, [node]
        return None
    if target not in ("reshape", "view", torch.reshape):
        return None
    expanded = node.args[0]
    if not isinstance(expanded, fx.Node) or _target(expanded) not in ("expand", torch.Tensor.expand):
        return None
    inserted = expanded.args[0]
    if not isinstance(inserted, fx.Node):
        return None
    if _target(inserted) in (torch.unsqueeze, "unsqueeze") and _args(inserted, ("input", "dim")).get("dim") == 2:
        x = inserted.args[0]
    elif _target(inserted) is operator.getitem and inserted.args[1] in (
            (slice(None), slice(None), None), (slice(None), slice(None), None, slice(None), slice(None))):
        x = inserted.args[0]
    else:
        return None
    x_meta, expanded_meta = tensor_meta(x), tensor_meta(expanded)
    if x_meta is None or expanded_meta is None or x_meta.dim() != 4 or expanded_meta.dim() != 5:
        return None
    batch, heads, length, width = x_meta.shape
    repeats = expanded_meta.shape[2]
    if not (isinstance(repeats, int) and same_shape(expanded_meta.shape, (batch, heads, repeats, length, width))
            and same_shape(meta.shape, (batch, heads * repeats, length, width))):
        return None
    return x, repeats, [node, expanded, inserted]


def _match_at(node: fx.Node) -> _Match | None:
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    params = _args(node, _SDPA_PARAMETERS)
    query, key, value = (tensor_meta(params.get(name)) for name in ("query", "key", "value"))
    out = tensor_meta(node)
    if None in (query, key, value, out) or query.dim() != 4:
        return None
    mask, causal_mask = params.get("attn_mask"), None
    if mask is not None:
        mask_meta = tensor_meta(mask)
        if params.get("is_causal", False) or mask_meta is None or mask_meta.dtype != torch.bool:
            return None
        causal_mask = _causal_mask(mask, query.shape[-2], key.shape[-2])
        # the mask must not broadcast the output to more rows than the query has
        if causal_mask is not None and not same_shape(out.shape, (*query.shape[:-1], value.shape[-1])):
            raise InexactMatch("the mask broadcasts the attention to a larger batch than the query's")
    grouped = None
    if not params.get("enable_gqa", False):
        key_repeats, value_repeats = _repeated_heads(params["key"]), _repeated_heads(params["value"])
        # enable_gqa pairs query head h with key head h // n: exact where the query has the repeated heads' count
        # (not one head broadcast against them)
        if (key_repeats and value_repeats and key_repeats[1] == value_repeats[1] > 1
                and same_shape(query.shape[:2], key.shape[:2]) and same_shape(key.shape[:2], value.shape[:2])):
            if mask is None or causal_mask is not None:  # with another mask, CUDA's enable_gqa is the math kernel
                grouped = key_repeats[0], value_repeats[0], key_repeats[2] + value_repeats[2]
    if causal_mask is None and grouped is None:
        return None
    return _Match(node, causal_mask, grouped)


def apply(graph: fx.Graph, record: Recorder) -> None:
    for match in find_matches(graph, record, _match_at):
        node, params = match.node, _args(match.node, _SDPA_PARAMETERS)
        variants = []
        if match.causal_mask is not None:
            params.update(attn_mask=None, is_causal=True)
            variants.append("causal mask -> is_causal")
        if match.grouped is not None:
            key, value, _ = match.grouped
            params.update(key=key, value=value, enable_gqa=True)
            variants.append("repeated kv -> enable_gqa")
        node.args = (params.pop("query"), params.pop("key"), params.pop("value"))
        node.kwargs = params
        record.rewrite(node, ", ".join(variants))
        erase_unused(graph, (match.causal_mask or []) + (match.grouped[2] if match.grouped else []))
