"""Pieces both normalisation families match: the inverse square root of a statistic plus eps, the product
that normalises with it, casts around the input, and the per-channel weight."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.passes.graph import (
    InexactMatch,
    canonical,
    dtype_of,
    float_operand,
    number,
    only_user,
    other_operand,
    same_shape,
    tensor_meta,
)


def not_constant(what: str) -> str:
    return f"{what} is neither a constant nor a float the graph computes"


def squared(arg) -> fx.Node | None:
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


def same_value(a, b) -> bool:
    """a and b are one node, or the same cast of one node (two ``x.float()`` calls)."""
    if a is b:
        return True
    ca, cb = canonical(a), canonical(b)
    return (
        ca is not None and cb is not None and ca.op == cb.op == "cast"
        and ca["input"] is cb["input"] and dtype_of(a) == dtype_of(b)
    )


def inverse_root(statistic: fx.Node, what: str):
    """Follow `statistic` (the mean square, or the variance) through ``+ eps`` to its inverse square root.

    Returns (root, eps, chain) where `root` is an rsqrt-like node (or the sqrt a division will use), eps a number
    or a graph float (see `float_operand`), and
    `chain` the nodes after `statistic` up to it; None if the statistic does not feed a square root. `what`
    names the statistic in near-miss reasons.
    """
    node, call = only_user(statistic), canonical(only_user(statistic))
    eps, chain = None, []
    if call is not None and call.op == "add" and call.get("alpha", 1) == 1:
        eps_operand = other_operand(call, statistic)
        eps = float_operand(eps_operand)
        if eps is None:
            raise InexactMatch(not_constant(f"eps added to {what}"))
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


def normalized(root: fx.Node, chain: list[fx.Node], normalizes: Callable[[Any, fx.Node], bool], mismatch: str):
    """The node computing t * root (or t / root for a sqrt), and the chain through it; None if absent.

    `normalizes(t, product)` says whether t is the tensor the statistic was taken of; if a multiply by the
    inverse root takes another tensor, the match is inexact with the reason `mismatch`."""
    node, call = only_user(root), canonical(only_user(root))
    if call is None:
        return None
    if canonical(root).op == "sqrt":
        if call.op == "div" and call["other"] is root and normalizes(call["input"], node):
            return node, chain + [node]
        if not (call.op == "reciprocal" or (call.op == "div" and number(call["input"]) == 1.0)):
            return None
        chain = chain + [node]
        node, call = only_user(node), canonical(only_user(node))
        root = chain[-1]
    if call is None or call.op != "mul":
        return None
    if not normalizes(other_operand(call, root), node):
        raise InexactMatch(mismatch)
    return node, chain + [node]


def upcast_source(z: fx.Node, dtype: torch.dtype) -> fx.Node | None:
    """The tensor `z` was cast from, when the kernel can take it as input: an upcast to fp32 or a no-op cast."""
    call = canonical(z)
    if call is None or call.op != "cast":
        return None
    source_dtype = dtype_of(call["input"])
    if source_dtype in FLOAT_DTYPES and (dtype == torch.float32 or source_dtype == dtype):
        return call["input"]
    return None


def cast_to(node: fx.Node | None, dtype: torch.dtype) -> bool:
    call = canonical(node)
    return call is not None and call.op == "cast" and dtype_of(node) == dtype


def check_weight(weight: fx.Node, x_meta: torch.Tensor, role: str = "weight") -> None:
    """Raise InexactMatch unless `weight` is a float vector over x's last dim on x's device."""
    meta = tensor_meta(weight)
    if meta is None:
        raise InexactMatch(f"{role} has no tensor metadata")
    if not same_shape(meta.shape, x_meta.shape[-1:]):
        raise InexactMatch(f"the {role} operand has shape {tuple(meta.shape)}, not a {role} over the last dim "
                           f"({x_meta.shape[-1]})")
    if meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"{role} dtype {meta.dtype} is not supported")
    if meta.device != x_meta.device:
        raise InexactMatch(f"{role} is on {meta.device}, input on {x_meta.device}")
