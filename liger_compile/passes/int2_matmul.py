"""Experimental: ternary weights unpacked from 2-bit codes, times int8 activations, become
``torch.ops.liger.matmul_int2_int8``, which never materialises the unpacked weights.

The unpacking is BitNet b1.58 inference code's, in the format of `liger_compile.kernels.int2_matmul`: four 2-bit
fields of one packed tensor P (K // 4, N), each ``(P >> 2j) & 3`` or ``(P & (3 << 2j)) >> 2j`` (also ``P & 3``
for j = 0 and, for a uint8 P, ``P >> 6`` for j = 3), with operators, ``torch.bitwise_and`` /
``torch.bitwise_right_shift`` or their methods; concatenated in order j = 0..3 along dim 0 (-2) into codes (K, N);
then ``- 1`` and a cast to int8, in either order (from uint8, ``0 - 1`` wraps to 255, which the cast makes -1), or
no cast where P is int8. P is uint8, or int8 with the top field masked after its shift (an arithmetic shift
copies the sign into the code otherwise). `liger_compile.ops.unpack_int2`, traced into the graph, is this spelling (on
``P.view(torch.uint8)``). The product, with x int8, is one of

- ``torch._int_mm(x, w)`` (variant ``int_mm``);
- ``x.to(torch.int32) @ w.to(torch.int32)``: ``@``, ``torch.matmul``, ``torch.mm``, their methods, ``.int()``
  (variant ``matmul int32``).

Reported, not rewritten: fields in another order, a shift or mask that does not select one 2-bit field, an offset
other than 1, fields concatenated along another dim, activations that are not int8, a product in another dtype
(a float matmul of the unpacked weights), and unpacked weights used elsewhere too (they would still be unpacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from liger_compile.ops.int2_matmul import CODES_PER_BYTE, PACKED_DTYPES
from liger_compile.passes.graph import (
    InexactMatch,
    Rewriter,
    canonical,
    dtype_of,
    find_matches,
    number,
    only_user,
    reduced_dims,
    same_shape,
    scalar_and_tensor,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "int2_matmul"
_TARGET = torch.ops.liger.matmul_int2_int8.default
_RIGHT_OPERAND = {"int_mm": "mat2", "matmul": "other", "mm": "mat2"}
_FIELD_SHIFTS = tuple(range(0, 2 * CODES_PER_BYTE, 2))
_CAST_METHODS = {"to", "type", "int", "char"}
_CAST_FUNCTIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.int, torch.Tensor.char}


@dataclass
class _Match:
    final: fx.Node  # the matmul
    x: fx.Node  # the int8 activations
    packed: fx.Node
    variant: str
    nodes: list[fx.Node]


@dataclass
class _Field:
    """``(source >> shift) & mask`` or, `mask_first`, ``(source & mask) >> shift``; a missing step is None."""

    source: fx.Node
    shift: int | None
    mask: int | None
    mask_first: bool
    nodes: list[fx.Node]


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        record.rewrite(match.final, match.variant)
        rewriter.replace(match.final, _TARGET, (match.x, match.packed), match.nodes)


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None or call.op not in _RIGHT_OPERAND:
        return None
    x, weights = call["input"], call.get(_RIGHT_OPERAND[call.op])
    if call.op == "int_mm":
        unpacked = _unpacked(weights)
        if unpacked is None:
            return None
        packed, nodes = unpacked
        _check_only_user(weights, node)
        variant = "int_mm"
    else:
        weights_int8 = _integer_cast(weights, torch.int32)
        unpacked = None if weights_int8 is None else _unpacked(weights_int8)
        if unpacked is None:
            _check_other_product(node, weights)
            return None
        packed, nodes = unpacked
        x_int8 = _integer_cast(x, torch.int32)
        if x_int8 is None or dtype_of(x_int8) != torch.int8:
            raise InexactMatch(f"the activations are {dtype_of(x if x_int8 is None else x_int8)}, not int8 cast to "
                               "int32: the op multiplies int8 activations")
        _check_only_user(weights_int8, weights)
        _check_only_user(weights, node)
        x, nodes, variant = x_int8, nodes + [weights, call["input"]], "matmul int32"
    x_meta, out_meta = tensor_meta(x), tensor_meta(node)
    if x_meta is None or out_meta is None:
        raise InexactMatch("no tensor metadata for the activations or the product")
    if x_meta.dtype != torch.int8 or x_meta.dim() == 0 or out_meta.dtype != torch.int32:
        raise InexactMatch(f"int8 activations with at least one dim and an int32 product needed, got {x_meta.dtype} "
                           f"{tuple(x_meta.shape)} and {out_meta.dtype}")
    return _Match(node, x, packed, variant, nodes + [node])


def _check_only_user(value: fx.Node, user: fx.Node) -> None:
    if only_user(value) is not user:
        raise InexactMatch("the unpacked weights are also used elsewhere, so they would still be unpacked")


def _check_other_product(matmul: fx.Node, weights) -> None:
    """A near-miss for a product of the unpacked weights (cast or not) computed in another dtype than int32."""
    cast = canonical(weights)
    if _unpacked(cast["input"] if cast is not None and cast.op == "cast" else weights) is not None:
        raise InexactMatch(f"the unpacked ternary weights are multiplied in {dtype_of(matmul)}: only the int32 "
                           "product of int8 activations (torch._int_mm, or both cast to int32) is exact and supported")


def _integer_cast(node, dtype: torch.dtype) -> fx.Node | None:
    """The tensor `node` casts to integer `dtype` (``.to``, ``.type``, ``.int()``, ``.char()``), keeping its shape
    and device; None if `node` is no such cast."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    is_cast = ((node.op == "call_method" and node.target in _CAST_METHODS)
               or (node.op == "call_function" and node.target in _CAST_FUNCTIONS))
    source, result = tensor_meta(node.args[0]), tensor_meta(node)
    if not is_cast or source is None or result is None:
        return None
    if result.dtype != dtype or source.device != result.device or not same_shape(source.shape, result.shape):
        return None
    return node.args[0]


def _through_int8_cast(value, nodes: list[fx.Node]):
    """The operand of `value` if it is a cast to int8 (then appended to `nodes`), else `value`."""
    source = _integer_cast(value, torch.int8)
    if source is None:
        return value
    nodes.append(value)
    return source


def _unpacked(weights) -> tuple[fx.Node, list[fx.Node]] | None:
    """(P, nodes) when `weights` is int8 ``codes - 1`` of the fields of P `_codes` reads, cast to int8 before or
    after the subtraction (or not at all for int8 codes)."""
    if dtype_of(weights) != torch.int8:
        return None
    nodes = []
    value = _through_int8_cast(weights, nodes)  # (codes - 1).to(torch.int8)
    offset = _offset(value)
    if offset is None:
        return None
    nodes.append(value)
    value, offset_value = offset
    codes = _codes(_through_int8_cast(value, nodes))  # codes.to(torch.int8) - 1
    if codes is None:
        return None
    if offset_value != 1:
        raise InexactMatch(f"the codes are offset by {offset_value:g}, not 1: not ternary weights -1, 0, 1")
    packed, codes_nodes = codes
    return packed, nodes + codes_nodes


def _offset(node) -> tuple[fx.Node, float] | None:
    """(t, c) when `node` is ``t - c`` or ``t + (-c)`` for a number c."""
    call = canonical(node)
    if call is not None and call.op == "sub" and call.get("alpha", 1) == 1 and isinstance(call["input"], fx.Node):
        value = number(call.get("other"))
        return None if value is None else (call["input"], value)
    found = scalar_and_tensor(node, "add")
    return None if found is None else (found[1], -found[0])


def _codes(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(P, nodes) when `node` concatenates four 2-bit fields of one 2-D uint8 or int8 P along dim 0, in order."""
    call = canonical(node)
    if call is None or call.op != "cat" or not isinstance(call["tensors"], (list, tuple)):
        return None
    fields = [_field(part) for part in call["tensors"]]
    if len(fields) != CODES_PER_BYTE or None in fields or len({f.source for f in fields}) != 1:
        return None
    packed = fields[0].source
    meta = tensor_meta(packed)
    if meta is None:
        raise InexactMatch("no tensor metadata for the packed weights")
    if meta.dtype not in PACKED_DTYPES or meta.dim() != 2:
        raise InexactMatch(f"the packed weights are {meta.dtype} of shape {tuple(meta.shape)}: the op takes a 2-D "
                           "uint8 or int8 (K // 4, N) tensor")
    dim = call.get("dim", 0)
    if reduced_dims(dim, meta.dim()) != (0,):
        raise InexactMatch(f"the fields are concatenated along dim {dim}: the packed layout stacks them along K "
                           "(dim 0)")
    positions = [_position(f, meta.dtype) for f in fields]
    if positions != list(range(CODES_PER_BYTE)):
        raise InexactMatch(f"the fields are concatenated in the order {positions} (field j at bits 2j..2j+1): the "
                           "packed layout takes them in the order [0, 1, 2, 3]")
    return packed, [node] + [n for f in fields for n in f.nodes]


def _field(node) -> _Field | None:
    """How `node` extracts bits of a tensor: a shift and a mask by integers, in either order, or one of them."""
    call = canonical(node)
    if call is None or call.op not in ("bitwise_and", "bitwise_right_shift"):
        return None
    outer = _integer_operand(call)
    if outer is None:
        return None
    source, outer_value = outer
    inner_call = canonical(source)
    inner = None
    if inner_call is not None and inner_call.op in ("bitwise_and", "bitwise_right_shift") and inner_call.op != call.op:
        inner = _integer_operand(inner_call)
    if call.op == "bitwise_and":
        if inner is None:
            return _Field(source, None, outer_value, True, [node])
        return _Field(inner[0], inner[1], outer_value, False, [node, source])
    if inner is None:
        return _Field(source, outer_value, None, False, [node])
    return _Field(inner[0], outer_value, inner[1], True, [node, source])


def _integer_operand(call) -> tuple[fx.Node, int] | None:
    """(t, n) for a bitwise op of a graph value t and a Python int n (in either order for and)."""
    operands = [(call["input"], call.get("other"))]
    if call.op == "bitwise_and":
        operands.append((call.get("other"), call["input"]))
    for tensor, value in operands:
        if isinstance(tensor, fx.Node) and isinstance(value, int) and not isinstance(value, bool):
            return tensor, value
    return None


def _position(field: _Field, dtype: torch.dtype) -> int:
    """The j of a field that reads bits 2j..2j+1 of P exactly as an unsigned code 0..3; a near-miss otherwise."""
    shift = field.shift or 0
    if field.mask is None:
        described = f"a field shifted by {shift} without a mask"
    elif field.shift is None:
        described = f"a field masked with {field.mask} without a shift"
    elif field.mask_first:
        described = f"a field masked with {field.mask} then shifted by {shift}"
    else:
        described = f"a field shifted by {shift} then masked with {field.mask}"
    if shift not in _FIELD_SHIFTS:
        raise InexactMatch(f"{described}: a 2-bit field's shift is 0, 2, 4 or 6")
    unmasked_top = field.mask is None and shift == _FIELD_SHIFTS[-1]  # P >> 6: the top field needs no mask
    expected_mask = (3 << shift) if field.mask_first else 3
    if field.mask != expected_mask and not unmasked_top:
        raise InexactMatch(f"{described}: the mask does not select the 2 bits of one field ({expected_mask} does)")
    sign_extends = dtype != torch.uint8 and shift == _FIELD_SHIFTS[-1] and (field.mask_first or unmasked_top)
    if sign_extends:
        raise InexactMatch(f"{described}: of {dtype} P, the arithmetic shift copies the sign into the code "
                           "(mask after shifting, or pack into uint8)")
    return shift // 2
