"""LayerNorm: find it however it is written and replace it with ``torch.ops.liger.layer_norm``.

Two entry points:

- ``F.layer_norm`` / ``torch.layer_norm`` / ``nn.LayerNorm`` over the last dim (one node);
- the arithmetic ``(z - mean(z)) * rsqrt(var(z) + eps)`` with the mean and the biased variance over the last
  dim, the variance written ``mean((z - mean)**2)`` (any square spelling) or ``var(z, unbiased=False)``, the
  inverse root in any of RMSNorm's spellings (``rsqrt``, ``/ sqrt``, ...), then ``* weight`` and ``+ bias``
  and a final cast back to the input's dtype (Cohere, DeBERTa, xLSTM, ConvNeXt-style code).

The op computes in fp32 and rounds once, as ``F.layer_norm`` does; arithmetic written in a 16-bit dtype rounds
every intermediate instead and is a near-miss, as are statistics over other dims, the unbiased variance and an
eps added outside the square root. This family runs before RMSNorm's, whose arithmetic matcher would otherwise
see the variance of ``z - mean`` as a mean square.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
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
from liger_compile.passes.graph import (
    Call,
    InexactMatch,
    Rewriter,
    canonical,
    dtype_of,
    find_matches,
    float_operand,
    number,
    only_user,
    other_operand,
    recompute_in_backward,
    reduced_dims,
    same_shape,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "layer_norm"
_TARGET = torch.ops.liger.layer_norm.default
_DEFAULT_EPS = 1e-5  # F.layer_norm's


@dataclass
class _Match:
    final: fx.Node  # the node whose value the op computes
    x: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float | fx.Node  # a number, or a float the graph computes
    variant: str
    nodes: list[fx.Node]  # nodes of this norm alone, erased if left without users
    shared: list[fx.Node] = field(default_factory=list)  # inputs other norms may share (an upcast of x)


def _match_at(node: fx.Node) -> _Match | None:
    call = canonical(node)
    if call is None or call.op not in ("layer_norm", "mean"):
        return None
    return _match_functional(node, call) if call.op == "layer_norm" else _match_arithmetic(node, call)


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _match_at):
        record.rewrite(match.final, match.variant)
        args = (match.x, match.weight, match.bias, match.eps)
        # The normalized output is saved only for the next linear layer's weight gradient; backward keeps the
        # input and the statistics anyway, so one more pass over the input makes it again.
        recompute_in_backward(rewriter.replace(match.final, _TARGET, args, match.nodes + match.shared), match.final)


def _check_input(x: fx.Node) -> torch.Tensor:
    meta = tensor_meta(x)
    if meta is None or meta.dim() == 0:
        raise InexactMatch("input has no tensor metadata")
    if meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"input dtype {meta.dtype} is not supported")
    return meta


# --- F.layer_norm / nn.LayerNorm ----------------------------------------------------------------------------

def _match_functional(node: fx.Node, call: Call) -> _Match:
    x, weight, bias = call["input"], call.get("weight"), call.get("bias")
    x_meta = _check_input(x)
    shape = call["normalized_shape"]
    if not isinstance(shape, (list, tuple)) or not same_shape(shape, x_meta.shape[-1:]):
        raise InexactMatch(f"normalized_shape {shape} is not the last dim only ({x_meta.shape[-1]})")
    eps_operand = call.get("eps", _DEFAULT_EPS)
    eps = float_operand(eps_operand)
    if eps is None:
        raise InexactMatch(not_constant("eps"))
    for role, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_weight(tensor, x_meta, role)
    if dtype_of(node) != x_meta.dtype:  # autocast runs layer_norm in fp32 on a 16-bit input
        raise InexactMatch(f"the result is {dtype_of(node)} for a {x_meta.dtype} input (autocast?)")
    return _Match(node, x, weight, bias, eps, "F.layer_norm", [node])


# --- the arithmetic spellings -------------------------------------------------------------------------------

def _check_last_dim_statistic(call: Call, meta: torch.Tensor, what: str) -> None:
    if reduced_dims(call.get("dim"), meta.dim()) != (meta.dim() - 1,):
        raise InexactMatch(f"{what} over dim={call.get('dim')} is not over the last dim only")
    if call.get("keepdim") is not True:
        raise InexactMatch(f"{what} without keepdim=True does not broadcast over the last dim")
    if call.get("dtype") is not None:
        raise InexactMatch(f"{what} with a dtype argument casts inside the statistic")


def _centered(mean: fx.Node, z: fx.Node) -> list[fx.Node]:
    """The nodes computing z - mean (code often writes it twice)."""
    found = []
    for user in mean.users:
        call = canonical(user)
        if (call is not None and call.op == "sub" and call.get("other") is mean and call.get("alpha", 1) == 1
                and same_value(call["input"], z)):
            found.append(user)
    return found


def _same_centering(node, mean: fx.Node) -> bool:
    """Whether `node` computes z - mean(z) again, with its own mean node taken like `mean`."""
    call = canonical(node)
    if call is None or call.op != "sub" or call.get("alpha", 1) != 1 or call.get("other") is mean:
        return False
    other, mean_call = canonical(call.get("other")), canonical(mean)
    return (other is not None and other.op == "mean" and set(other.params) == set(mean_call.params)
            and same_value(other["input"], mean_call["input"]) and same_value(call["input"], mean_call["input"])
            and all(other[k] == mean_call[k] for k in other.params if k != "input"))


def _biased(call: Call) -> bool | None:
    """Whether a var() call divides by n (True), by n - 1 (False); None if its correction is not constant."""
    if "correction" in call.params:
        correction = number(call["correction"])
        return None if correction is None else correction == 0
    unbiased = call.get("unbiased", True)
    return (not unbiased) if isinstance(unbiased, bool) else None


def _variance(z: fx.Node, centered: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """The node computing the biased variance of z over the last dim, and the nodes leading to it (excluding
    the centered ones): ``mean(c**2, -1, keepdim=True)`` of a centered node c, or ``var(z, -1, ...)``."""
    for c in centered:
        for square in c.users:
            statistic = only_user(square)
            call = canonical(statistic)
            if squared(square) is c and call is not None and call.op == "mean" and call["input"] is square:
                _check_last_dim_statistic(call, tensor_meta(c), "the variance's mean")
                return statistic, [square, statistic]
    for user in z.users:
        call = canonical(user)
        if call is None or call.op != "var":
            continue
        biased = _biased(call)
        if biased is None:
            raise InexactMatch(not_constant("the variance's correction"))
        if not biased:
            raise InexactMatch("the variance is unbiased (divides by n - 1); LayerNorm's divides by n")
        _check_last_dim_statistic(call, tensor_meta(z), "the variance")
        return user, [user]
    return None


def _match_arithmetic(mean: fx.Node, call: Call) -> _Match | None:
    z = call["input"]
    if not isinstance(z, fx.Node):
        return None
    centered = _centered(mean, z)
    if not centered:
        return None
    z_meta = _check_input(z)
    if any(tensor_meta(c) is None or tensor_meta(c).shape != z_meta.shape for c in centered):
        raise InexactMatch("the centered input has no tensor metadata or another shape than the input")
    found = _variance(z, centered)
    if found is None:
        return None
    variance, variance_nodes = found
    found = inverse_root(variance, "the variance")
    if found is None:
        return None
    root, eps, chain = found
    _check_last_dim_statistic(call, z_meta, "the mean")
    normalized_operands = []

    def normalizes(operand, _product) -> bool:
        if operand in centered or _same_centering(operand, mean):
            normalized_operands.append(operand)
            return True
        return False

    found = normalized(root, chain, normalizes,
                       "the tensor normalised is not the centered input whose variance was taken")
    if found is None:
        return None
    h, chain = found
    again = [n for n in normalized_operands if n not in centered]  # z - mean written a second time
    statistic = [mean, *centered, *variance_nodes, *chain, *again, *(canonical(n)["other"] for n in again)]
    if any(tensor_meta(n) is None for n in statistic):
        raise InexactMatch("nodes lack tensor metadata")
    if any(dtype_of(n) != torch.float32 for n in statistic):
        raise InexactMatch(f"the arithmetic runs in {z_meta.dtype}, rounding every step; the kernel computes "
                           "in fp32 and rounds once")
    return _extend(h, z, z_meta, eps, statistic)


def _affine(node: fx.Node, op: str, z_meta: torch.Tensor, role: str) -> tuple[fx.Node, fx.Node] | None:
    """(result, vector) when `node`'s only user is ``node <op> vector`` with an fp32 result (``* weight`` or
    ``+ bias``), the vector over the last dim; None if the next step is something else."""
    user = only_user(node)
    call = canonical(user)
    if call is None or call.op != op or call.get("alpha", 1) != 1:
        return None
    vector = other_operand(call, node)
    if tensor_meta(vector) is None or dtype_of(user) != torch.float32:
        return None
    check_weight(vector, z_meta, role)
    return user, vector


def _extend(h: fx.Node, z: fx.Node, z_meta: torch.Tensor, eps: float, nodes: list[fx.Node]) -> _Match:
    """Grow the match from the normalised value `h` through ``* weight``, ``+ bias`` and a final cast."""
    final, weight, bias = h, None, None
    weighted = _affine(final, "mul", z_meta, "weight")
    if weighted is not None:
        final, weight = weighted
        nodes = nodes + [final]
    shifted = _affine(final, "add", z_meta, "bias")
    if shifted is not None:
        final, bias = shifted
        nodes = nodes + [final]
    variant = "arithmetic" + ("".join(f" {name}" for name, t in (("* weight", weight), ("+ bias", bias)) if t))
    # The op takes the tensor z was upcast from and rounds to its dtype, when the code casts back to it;
    # otherwise the fp32 tensor itself, returning fp32.
    source = upcast_source(z, torch.float32)
    if source is not None and cast_to(only_user(final), dtype_of(source)):
        cast = only_user(final)
        return _Match(cast, source, weight, bias, eps, variant + " (cast back)", nodes + [cast], [z])
    return _Match(final, z, weight, bias, eps, variant, nodes)
