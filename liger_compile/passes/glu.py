"""Gated MLP activations: ``act(a) * b`` becomes ``torch.ops.liger.gated_activation`` (SwiGLU, GeGLU).

The activation may be ``F.silu`` (``nn.SiLU``, HF ``silu``/``swish``), ``F.gelu`` with ``approximate="tanh"``
(``nn.GELU("tanh")``, HF ``gelu_pytorch_tanh``) or exact (``nn.GELU()``, HF ``gelu``), or HF ``gelu_new``'s
arithmetic ``0.5 * a * (1 + tanh(sqrt(2/pi) * (a + 0.044715 * a**3)))`` in fp32; either operand order of the
multiply. When ``a`` and ``b`` are the two halves of one tensor (``gate_up.chunk(2, -1)`` or
``split(n, -1)``, as in Phi-3), the rewrite takes that tensor whole (``gated_activation_packed``), so neither the
halves nor their gradients are materialised.

When the product's one user is a bias-free ``F.linear`` of it in its dtype (a gated MLP's down projection), the
linear goes into the rewrite too (``gated_linear``): backward then writes the product, which the projection's
weight gradient needs, in the same kernel pass as the activation's gradients instead of recomputing it in a pass
of its own. Reported as, e.g., ``swiglu + down projection``.

The multiply must be elementwise over tensors of one shape, dtype and device, and the activation's value must
feed only it; anything else is left alone and, when it looks like a gated activation, reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.passes.graph import (
    InexactMatch,
    Rewriter,
    canonical,
    find_matches,
    dtype_of,
    number,
    only_user,
    last_dim_half,
    other_operand,
    recompute_in_backward,
    same_shape,
    scalar_and_tensor,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "glu"
_TARGET = torch.ops.liger.gated_activation.default
_PACKED_TARGET = torch.ops.liger.gated_activation_packed.default
_LINEAR_TARGET = torch.ops.liger.gated_linear.default
_VARIANTS = {"silu": "swiglu", "gelu_tanh": "geglu_tanh", "gelu": "geglu"}
_GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


@dataclass
class _Match:
    final: fx.Node  # the multiply
    activation: str
    a: fx.Node
    b: fx.Node
    spelling: str
    nodes: list[fx.Node]  # the activation's nodes, the multiply, and the down projection if it is taken in
    packed: tuple[fx.Node, list[fx.Node]] | None = None  # (gate_up, its split nodes) when a and b are its halves
    down_projection: tuple[fx.Node, fx.Node] | None = None  # (the linear, its weight)


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None or call.op != "mul":
        return None
    match = _match(node, call["input"], call.get("other"))
    if match is not None:
        match.packed = _packed_source(match.a, match.b)
        match.down_projection = _down_projection(node) if match.packed is None else None
        if match.down_projection is not None:
            match.nodes.append(match.down_projection[0])
    return match


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        variant = _VARIANTS[match.activation] + (" packed" if match.packed is not None else "")
        if match.spelling:
            variant += f" ({match.spelling})"
        if match.down_projection is not None:
            linear, weight = match.down_projection
            record.rewrite(match.final, f"{variant} + down projection")
            new = rewriter.replace(linear, _LINEAR_TARGET, (match.a, match.b, weight, match.activation),
                                   match.nodes)
            if "recompute" in linear.meta:  # a policy of the user's (selective checkpointing) for the linear
                new.meta["recompute"] = linear.meta["recompute"]
            continue
        record.rewrite(match.final, variant)
        if match.packed is None:
            new = rewriter.replace(match.final, _TARGET, (match.a, match.b, match.activation), match.nodes)
        else:
            source, split_nodes = match.packed
            new = rewriter.replace(match.final, _PACKED_TARGET, (source, match.activation),
                                   match.nodes + split_nodes)
        # The product, as large as both inputs together, is recomputed for the down projection's weight gradient
        # (backward keeps the inputs anyway), as Inductor does for its own pointwise kernels.
        recompute_in_backward(new, match.final)


def _down_projection(product: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the linear, its weight) when `product`'s one user is ``F.linear(product, weight)`` without a bias, in the
    product's dtype and device (no autocast cast between them), with a 2-D weight over its last dim."""
    linear = only_user(product)
    call = canonical(linear)
    if (call is None or call.op != "linear" or call["input"] is not product or call.get("bias") is not None
            or linear.kwargs.get("out") is not None):
        return None
    weight = call["weight"]
    metas = [tensor_meta(n) for n in (product, weight, linear)]
    if any(meta is None for meta in metas):
        return None
    y, w, out = metas
    if w.dim() != 2 or not same_shape(w.shape[1:], y.shape[-1:]):
        return None
    if len({y.dtype, w.dtype, out.dtype}) > 1 or len({y.device, w.device, out.device}) > 1:
        return None
    return linear, weight


def _match(mul: fx.Node, x, y) -> _Match | None:
    for activated, b in ((x, y), (y, x)):
        found = _activation(activated)
        if found is not None:
            break
    else:
        _check_sigmoid_gate(x, y)
        return None
    activation, a, nodes, spelling = found
    if not isinstance(b, fx.Node):
        return None  # a Python scalar factor: not a gated unit
    if only_user(activated) is not mul:
        raise InexactMatch("the activation's output is also used elsewhere, so it would be computed twice")
    metas = {"a": tensor_meta(a), "b": tensor_meta(b), "activation": tensor_meta(activated),
             "product": tensor_meta(mul)}
    missing = [name for name, meta in metas.items() if meta is None]
    if missing:
        raise InexactMatch(f"no tensor metadata for {', '.join(missing)}")
    shapes = {name: tuple(meta.shape) for name, meta in metas.items()}
    if not all(same_shape(meta.shape, metas["a"].shape) for meta in metas.values()):
        raise InexactMatch(f"operands broadcast (shapes {shapes}); the kernel multiplies tensors of one shape")
    dtypes = {name: meta.dtype for name, meta in metas.items()}
    if len(set(dtypes.values())) > 1 or metas["a"].dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"dtypes differ or are not supported: {dtypes}")
    if len({meta.device for meta in metas.values()}) > 1:
        raise InexactMatch("operands are on different devices")
    return _Match(mul, activation, a, b, spelling, nodes + [mul])


def _activation(node) -> tuple[str, fx.Node, list[fx.Node], str] | None:
    """If `node` computes a supported activation of one tensor: (activation, its input, nodes, spelling)."""
    call = canonical(node)
    if call is None:
        return None
    if call.op == "silu":
        if call.get("inplace", False):
            raise InexactMatch("F.silu(inplace=True) also overwrites its input")
        return "silu", call["input"], [node], ""
    if call.op == "gelu":
        approximate = call.get("approximate", "none")
        if approximate not in _GELU_APPROXIMATIONS:
            raise InexactMatch(f"gelu approximate={approximate!r} is not a constant 'none' or 'tanh'")
        return _GELU_APPROXIMATIONS[approximate], call["input"], [node], ""
    found = _gelu_new_arithmetic(node)
    if found is None:
        return None
    a, nodes = found
    if any(dtype_of(n) != torch.float32 for n in nodes):
        raise InexactMatch(f"gelu_new arithmetic in {dtype_of(node)} rounds after every step; the kernel rounds once")
    return "gelu_tanh", a, nodes, "gelu_new"


def _constant_times(node, value: float) -> fx.Node | None:
    """t when `node` is ``value * t`` (either order; `value` to 1e-9, as code spells it with fewer digits)."""
    found = scalar_and_tensor(node, "mul")
    return found[1] if found is not None and math.isclose(found[0], value, rel_tol=1e-9) else None


def _plus_constant(node, value: float) -> fx.Node | None:
    """t when `node` is ``value + t`` (either order)."""
    found = scalar_and_tensor(node, "add")
    return found[1] if found is not None and found[0] == value else None


def _gelu_new_arithmetic(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(a, nodes) when `node` is ``(0.5 * a) * (1 + tanh(sqrt(2/pi) * (a + 0.044715 * a**3)))``."""
    call = canonical(node)
    if call is None or call.op != "mul":
        return None
    for half, one_plus in ((call["input"], call.get("other")), (call.get("other"), call["input"])):
        a = _constant_times(half, 0.5)
        tanh = _plus_constant(one_plus, 1.0)
        tanh_call = canonical(tanh)
        if a is None or tanh_call is None or tanh_call.op != "tanh":
            continue
        inner = _constant_times(tanh_call["input"], math.sqrt(2 / math.pi))
        inner_call = canonical(inner)
        if inner_call is None or inner_call.op != "add" or inner_call.get("alpha", 1) != 1:
            continue
        cubic_term = other_operand(inner_call, a)
        cube = _constant_times(cubic_term, 0.044715)
        cube_call = canonical(cube)
        if cube_call is None or cube_call.op != "pow" or cube_call["input"] is not a:
            continue
        if number(cube_call["exponent"]) != 3.0:
            continue
        return a, [cube, cubic_term, inner, tanh_call["input"], tanh, one_plus, half, node]
    return None


def _check_sigmoid_gate(x, y) -> None:
    for gate, other in ((x, y), (y, x)):
        call = canonical(gate)
        if call is None or call.op != "sigmoid" or call["input"] is other:
            continue
        gate_meta, other_meta = tensor_meta(gate), tensor_meta(other)
        if gate_meta is not None and other_meta is not None and same_shape(gate_meta.shape, other_meta.shape):
            raise InexactMatch("sigmoid(a) * b is a sigmoid-gated unit (GLU), not SwiGLU: no kernel for it")


def _packed_source(a: fx.Node, b: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(t, split nodes) when a and b are the first and second halves of t's last dim, by one chunk or split."""
    first, second = last_dim_half(a), last_dim_half(b)
    if first is None or second is None:
        return None
    (source, first_index, (_, split)), (_, second_index, (_, split_b)) = first, second
    if split is not split_b or (first_index, second_index) != (0, 1):
        return None
    return source, [a, b, split]
