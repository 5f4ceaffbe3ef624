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
    float_operand,
    only_user,
    other_operand,
    Rewriter,
    recompute_in_backward,
    reduced_dims,
    same_shape,
    scalar_and_tensor,
    tensor_meta,
)
from liger_compile.passes._norm import (
    cast_to,
    check_weight,
    inverse_root,
    normalized,
    not_constant,
    same_value,
    squared,
    upcast_source,
)
from liger_compile.passes.manager import Recorder

FAMILY = "rms_norm"
_TARGET = torch.ops.liger.rms_norm.default


@dataclass
class _Match:
    final: fx.Node  # the node whose value the op computes
    x: fx.Node
    weight: fx.Node | None
    eps: float | fx.Node  # a number, or a float the graph computes
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
        # The normalized output is saved only for the next linear layer's weight gradient; backward keeps the
        # input and the statistics anyway, so one more pass over the input makes it again.
        recompute_in_backward(rewriter.replace(match.final, _TARGET, args, match.nodes + match.shared), match.final)




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
    eps = torch.finfo(torch.float32).eps if eps_operand is None else float_operand(eps_operand)
    if eps is None:
        raise InexactMatch(not_constant("eps"))
    if weight is not None:
        check_weight(weight, x_meta)
    if not _torch_rms_norm_is_gemma_mode():
        raise InexactMatch(f"torch {torch.__version__} rounds rms_norm differently from the kernel's modes")
    return _Match(node, x, weight, eps, 0.0, "gemma", "torch.rms_norm", [node])


# --- the arithmetic spellings -----------------------------------------------------------------------------



def _normalizes(operand, z: fx.Node, product: fx.Node) -> bool:
    """Whether `product` (operand * inverse root, or operand / root) normalises the value `z` was squared from:
    `operand` is `z`, the same cast of its source, or the source itself when the product is computed in
    `z`'s dtype and `z` is an exact cast of it (type promotion then widens the source exactly as `z` did)."""
    return same_value(operand, z) or (
        operand is upcast_source(z, dtype_of(z)) and dtype_of(product) == dtype_of(z))








def _match_arithmetic(mean_sq: fx.Node, call: Call) -> _Match | None:
    z = squared(call["input"])
    if z is None:
        return None
    found = inverse_root(mean_sq, "the mean square")
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
    found = normalized(root, chain, lambda operand, product: _normalizes(operand, z, product),
                       "the tensor normalised is not the one whose mean square was taken")
    if found is None:
        return None
    h, chain = found
    statistic = [call["input"], mean_sq] + chain
    if any(dtype_of(n) != z_meta.dtype for n in statistic):
        raise InexactMatch("dtype changes inside the statistic (autocast?), which the kernel does not round like")
    return _extend(h, z, z_meta, eps, statistic)






def _extend(h: fx.Node, z: fx.Node, z_meta: torch.Tensor, eps: float, nodes: list[fx.Node]) -> _Match:
    """Grow the match from the normalised value `h` through the casts and weight multiply that follow."""
    source = upcast_source(z, z_meta.dtype)
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
        while cast_to(only_user(final), torch.float32):
            nodes, final = nodes + [final], only_user(final)
        weighted = _weight_multiply(final, z_meta, result_dtype=torch.float32)
        if weighted is None:
            return match(final, "llama", "fp32")
        mul, weight, offset, extra = weighted
        return match(mul, "llama", "fp32", weight=weight, offset=offset, extra=(final, *extra))

    after = only_user(h)
    if cast_to(after, x_dtype):  # Llama: round the normalised value, then multiply by the weight
        weighted = _weight_multiply(after, z_meta, result_dtype=None)
        if weighted is None:
            return match(after, "llama", "llama", extra=(h,))
        mul, weight, offset, extra = weighted
        return match(mul, "llama", "llama", weight=weight, offset=offset, extra=(h, after, *extra))
    weighted = _weight_multiply(h, z_meta, result_dtype=torch.float32)
    if weighted is not None:
        mul, weight, offset, extra = weighted
        cast = only_user(mul)
        if cast_to(cast, x_dtype):  # Gemma: multiply in fp32, round once at the end
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
    check_weight(weight, z_meta)
    w_dtype = dtype_of(weight)
    if weight_dtype is not None and w_dtype != weight_dtype:
        return None
    expected = result_dtype or torch.promote_types(dtype_of(normalized), w_dtype)
    if dtype_of(mul) != expected:
        return None
    return mul, weight, offset, absorbed

