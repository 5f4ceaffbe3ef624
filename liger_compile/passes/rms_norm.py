"""RMSNorm: find it however it is written and replace it with ``torch.ops.liger.rms_norm``.

Two entry points:

- ``torch.rms_norm`` / ``F.rms_norm`` / ``nn.RMSNorm`` (one node);
- the arithmetic ``z * rsqrt(mean(z**2, -1, keepdim=True) + eps)`` in any spelling (``pow(2)``, ``z*z``,
  ``square``; ``rsqrt``, ``1/sqrt``, ``reciprocal(sqrt)``, ``pow(-0.5)``, ``z / sqrt``), then greedily the
  casts and the weight multiply around it, as long as they keep the computation exactly one of the op's
  casting modes (HF Llama, Gemma's ``1 + weight``, Meta's ``.type_as``, Qwen3's q/k norms, plain fp32).

Every node's dtype is checked against the casting mode from Dynamo's ``example_value`` meta, so autocast or
odd casts that change rounding end the match (or make it a near-miss) instead of changing numerics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.ops.rms_norm import rms_norm_reference
from liger_compile.passes.graph import (
    Call,
    InexactMatch,
    canonical,
    find_matches,
    dtype_of,
    number,
    only_user,
    other_operand,
    Rewriter,
    reduced_dims,
    same_shape,
    scalar_and_tensor,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "rms_norm"
_TARGET = torch.ops.liger.rms_norm.default


@dataclass
class _Match:
    final: fx.Node  # the node whose value the op computes
    x: fx.Node
    weight: fx.Node | None
    eps: float
    offset: float
    casting_mode: str
    variant: str
    nodes: list[fx.Node]  # nodes of this norm alone, erased if left without users
    shared: list[fx.Node] = field(default_factory=list)  # inputs other norms may share (an upcast of x)


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None or call.op not in ("rms_norm", "mean"):
        return None
    return _match_functional(node, call) if call.op == "rms_norm" else _match_arithmetic(node, call)


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        args = (match.x, match.weight, match.eps, match.offset, match.casting_mode)
        record.rewrite(match.final, match.variant)
        rewriter.replace(match.final, _TARGET, args, match.nodes + match.shared)


def _not_constant(what: str, operand) -> str:
    if isinstance(operand, fx.Node) and isinstance(operand.meta.get("example_value"), torch.SymFloat):
        return (f"{what} is a float Dynamo made dynamic (after recompiling with another value), not a constant; "
                "torch._dynamo.config.specialize_float = True keeps it constant")
    return f"{what} is not a constant"


# --- torch.rms_norm / F.rms_norm / nn.RMSNorm -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_rms_norm_is_gemma_mode() -> bool:
    """Whether this torch's rms_norm rounds like our gemma mode (fp32 weight multiply, one final cast).

    Older releases cast before multiplying by the weight; the two differ in the last bf16 bit on random data.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=generator).to(torch.bfloat16)
    weight = torch.randn(64, generator=generator).to(torch.bfloat16)
    expected, _ = rms_norm_reference(x, weight, 1e-6, casting_mode="gemma")
    return torch.equal(torch.rms_norm(x, [64], weight, 1e-6), expected)


def _match_functional(node: fx.Node, call: Call) -> _Match:
    x, weight = call["input"], call.get("weight")
    x_meta = tensor_meta(x)
    if x_meta is None or x_meta.dim() == 0:
        raise InexactMatch("input has no tensor metadata")
    if x_meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"input dtype {x_meta.dtype} is not supported")
    shape = call["normalized_shape"]
    if not isinstance(shape, (list, tuple)) or not same_shape(shape, x_meta.shape[-1:]):
        raise InexactMatch(f"normalized_shape {shape} is not the last dim ({x_meta.shape[-1]})")
    eps_operand = call.get("eps")
    eps = torch.finfo(torch.float32).eps if eps_operand is None else number(eps_operand)
    if eps is None:
        raise InexactMatch(_not_constant("eps", eps_operand))
    if weight is not None:
        _check_weight(weight, x_meta)
    if not _torch_rms_norm_is_gemma_mode():
        raise InexactMatch(f"torch {torch.__version__} rounds rms_norm differently from the kernel's modes")
    return _Match(node, x, weight, eps, 0.0, "gemma", "torch.rms_norm", [node])


# --- the arithmetic spellings -----------------------------------------------------------------------------

def _squared(arg) -> fx.Node | None:
    """z when `arg` is z**2, z*z or square(z)."""
    call = canonical(arg)
    if call is None:
        return None
    z = call["input"]
    if not isinstance(z, fx.Node):
        return None
    if (call.op == "pow" and number(call["exponent"]) == 2.0) or call.op == "square":
        return z
    if call.op == "mul" and call["other"] is z:
        return z
    return None


def _normalizes(operand, z: fx.Node, product: fx.Node) -> bool:
    """Whether `product` (operand * inverse root, or operand / root) normalises the value `z` was squared from:
    `operand` is `z`, the same cast of its source, or the source itself when the product is computed in
    `z`'s dtype and `z` is an exact cast of it (type promotion then widens the source exactly as `z` did)."""
    return _same_value(operand, z) or (
        operand is _upcast_source(z, dtype_of(z)) and dtype_of(product) == dtype_of(z))


def _same_value(a, b) -> bool:
    """a and b are one node, or the same cast of one node (two ``x.float()`` calls)."""
    if a is b:
        return True
    ca, cb = canonical(a), canonical(b)
    return (
        ca is not None and cb is not None and ca.op == cb.op == "cast"
        and ca["input"] is cb["input"] and dtype_of(a) == dtype_of(b)
    )


def _inverse_root(mean_sq: fx.Node):
    """Follow mean(z**2) through ``+ eps`` to its inverse square root.

    Returns (root, eps, chain) where `root` is an rsqrt-like node (or the sqrt a division will use) and
    `chain` the nodes after `mean_sq` up to it; None if the mean square does not feed a square root.
    """
    node, call = only_user(mean_sq), canonical(only_user(mean_sq))
    eps, chain = None, []
    if call is not None and call.op == "add" and call.get("alpha", 1) == 1:
        eps_operand = other_operand(call, mean_sq)
        eps = number(eps_operand)
        if eps is None:
            raise InexactMatch(_not_constant("eps added to the mean square", eps_operand))
        chain.append(node)
        node = only_user(node)
        call = canonical(node)
    if call is None or call.op not in ("rsqrt", "sqrt", "pow"):
        return None
    if call.op == "pow" and number(call["exponent"]) != -0.5:
        return None
    chain.append(node)
    if call.op == "sqrt":
        after = canonical(only_user(node))
        if eps is None and after is not None and after.op == "add":
            raise InexactMatch("eps is added outside the square root")
    if eps is None:
        raise InexactMatch("no eps is added inside the square root")
    return node, eps, chain


def _normalized(root: fx.Node, z: fx.Node, chain: list[fx.Node]):
    """The node computing z * root (or z / root for a sqrt), and the chain through it; None if absent."""
    node, call = only_user(root), canonical(only_user(root))
    if call is None:
        return None
    if canonical(root).op == "sqrt":
        if call.op == "div" and call["other"] is root and _normalizes(call["input"], z, node):
            return node, chain + [node]
        if not (call.op == "reciprocal" or (call.op == "div" and number(call["input"]) == 1.0)):
            return None
        chain = chain + [node]
        node, call = only_user(node), canonical(only_user(node))
        root = chain[-1]
    if call is None or call.op != "mul":
        return None
    if not _normalizes(other_operand(call, root), z, node):
        raise InexactMatch("the tensor normalised is not the one whose mean square was taken")
    return node, chain + [node]


def _match_arithmetic(mean_sq: fx.Node, call: Call) -> _Match | None:
    z = _squared(call["input"])
    if z is None:
        return None
    found = _inverse_root(mean_sq)
    if found is None:
        return None
    root, eps, chain = found
    z_meta = tensor_meta(z)
    if z_meta is None or any(tensor_meta(n) is None for n in [mean_sq, *chain]):
        raise InexactMatch("nodes lack tensor metadata")
    if z_meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"input dtype {z_meta.dtype} is not supported")
    if reduced_dims(call.get("dim"), z_meta.dim()) != (z_meta.dim() - 1,):
        raise InexactMatch(f"mean over dim={call.get('dim')} is not over the last dim only")
    if call.get("keepdim") is not True:
        raise InexactMatch("mean without keepdim=True does not broadcast over the last dim")
    if call.get("dtype") is not None:
        raise InexactMatch("mean with a dtype argument casts inside the statistic")
    found = _normalized(root, z, chain)
    if found is None:
        return None
    h, chain = found
    statistic = [call["input"], mean_sq] + chain
    if any(dtype_of(n) != z_meta.dtype for n in statistic):
        raise InexactMatch("dtype changes inside the statistic (autocast?), which the kernel does not round like")
    return _extend(h, z, z_meta, eps, statistic)


def _upcast_source(z: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """The tensor `z` was cast from, when the kernel can take it as input: an upcast to fp32 or a no-op cast."""
    call = canonical(z)
    if call is None or call.op != "cast":
        return None
    source_dtype = dtype_of(call["input"])
    if source_dtype in FLOAT_DTYPES and (dtype == torch.float32 or source_dtype == dtype):
        return call["input"]
    return None


def _cast_to(node: fx.Node | None, dtype: torch.dtype) -> bool:
    call = canonical(node)
    return call is not None and call.op == "cast" and dtype_of(node) == dtype


def _extend(h: fx.Node, z: fx.Node, z_meta: torch.Tensor, eps: float, nodes: list[fx.Node]) -> _Match:
    """Grow the match from the normalised value `h` through the casts and weight multiply that follow."""
    source = _upcast_source(z, z_meta.dtype)
    x = source if source is not None else z
    x_dtype, compute_dtype = dtype_of(x), z_meta.dtype
    upcast = [z] if source is not None else []

    def match(final, mode, variant, x=x, weight=None, offset=0.0, extra=()):
        return _Match(final, x, weight, eps, offset, mode, variant, nodes + list(extra) + [final], upcast)

    if compute_dtype != torch.float32:  # all arithmetic in a 16-bit dtype
        weighted = _weight_multiply(h, z_meta, result_dtype=x_dtype, weight_dtype=x_dtype)
        if weighted is None:
            return match(h, "none", "none")
        final, weight, offset, extra = weighted
        return match(final, "none", "none", weight=weight, offset=offset, extra=extra)

    if x_dtype == torch.float32:  # fp32 throughout: every mode computes the same; no-op casts are absorbed
        final = h
        while _cast_to(only_user(final), torch.float32):
            nodes, final = nodes + [final], only_user(final)
        weighted = _weight_multiply(final, z_meta, result_dtype=torch.float32)
        if weighted is None:
            return match(final, "llama", "fp32")
        mul, weight, offset, extra = weighted
        return match(mul, "llama", "fp32", weight=weight, offset=offset, extra=(final, *extra))

    after = only_user(h)
    if _cast_to(after, x_dtype):  # Llama: round the normalised value, then multiply by the weight
        weighted = _weight_multiply(after, z_meta, result_dtype=None)
        if weighted is None:
            return match(after, "llama", "llama", extra=(h,))
        mul, weight, offset, extra = weighted
        return match(mul, "llama", "llama", weight=weight, offset=offset, extra=(h, after, *extra))
    weighted = _weight_multiply(h, z_meta, result_dtype=torch.float32)
    if weighted is not None:
        mul, weight, offset, extra = weighted
        cast = only_user(mul)
        if _cast_to(cast, x_dtype):  # Gemma: multiply in fp32, round once at the end
            return match(cast, "gemma", "gemma", weight=weight, offset=offset, extra=(h, mul, *extra))
        # Result stays fp32: the op takes the fp32 tensor, so its modes coincide.
        return match(mul, "llama", "fp32", x=z, weight=weight, offset=offset, extra=(h, *extra))
    return match(h, "llama", "fp32", x=z)


def _weight_multiply(normalized: fx.Node, z_meta: torch.Tensor, *, result_dtype, weight_dtype=None):
    """If `normalized`'s only user multiplies it by a per-channel weight (or offset + weight) with the
    expected result dtype, return (mul node, weight, offset, absorbed nodes); None if it is something else.

    `result_dtype=None` means the dtype PyTorch's promotion gives (what llama mode produces).
    """
    mul = only_user(normalized)
    call = canonical(mul)
    if call is None or call.op != "mul":
        return None
    factor = other_operand(call, normalized)
    if tensor_meta(factor) is None:
        return None  # a Python scalar: a different computation, left outside the match
    weight, offset, absorbed = factor, 0.0, []
    offset_plus_weight = scalar_and_tensor(factor, "add")
    if offset_plus_weight is not None and dtype_of(offset_plus_weight[1]) == dtype_of(factor):
        offset, weight = offset_plus_weight
        absorbed = [factor]
    _check_weight(weight, z_meta)
    w_dtype = dtype_of(weight)
    if weight_dtype is not None and w_dtype != weight_dtype:
        return None
    expected = result_dtype or torch.promote_types(dtype_of(normalized), w_dtype)
    if dtype_of(mul) != expected:
        return None
    return mul, weight, offset, absorbed


def _check_weight(weight: fx.Node, x_meta: torch.Tensor) -> None:
    meta = tensor_meta(weight)
    if meta is None:
        raise InexactMatch("weight has no tensor metadata")
    if not same_shape(meta.shape, x_meta.shape[-1:]):
        raise InexactMatch(f"multiplied by a tensor of shape {tuple(meta.shape)}, not a weight over the last dim "
                        f"({x_meta.shape[-1]})")
    if meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"weight dtype {meta.dtype} is not supported")
    if meta.device != x_meta.device:
        raise InexactMatch(f"weight is on {meta.device}, input on {x_meta.device}")
