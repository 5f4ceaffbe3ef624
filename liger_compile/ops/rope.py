"""Rotary position embedding (the rotate_half form of Llama, GPT-NeoX and most HF models) as custom ops.

- ``torch.ops.liger.rope(x, cos, sin)`` = ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim =
  cos.shape[-1]`` columns of `x`'s last dim, the other columns passed through (partial rotary, as GPT-NeoX and
  Phi do with ``torch.cat([rotated, x_pass], -1)``).
- ``torch.ops.liger.rope_pair(q, k, cos, sin)`` rotates q and k with one kernel launch (GQA: their head counts
  may differ).

cos and sin are the tensors the model multiplies with, already unsqueezed: they broadcast against `x` as in
``x * cos`` (e.g. ``(B, 1, T, D)`` for ``(B, H, T, D)`` heads, ``(B, T, 1, D)`` for ``(B, T, H, D)``), so any
position ids and any RoPE scaling the model computed are used as they are. Up to 4 dims; any strides.

cos and sin share a dtype, which may differ from x's: the result then has the promoted dtype, as ``x * cos`` has
(bf16 q and k from an autocast linear times HF's fp32 cos and sin give fp32). Each product is rounded to the
result's dtype before the sum, as in eager PyTorch, and in backward to x's. Backward is the rotation by −sin and
saves nothing but cos and sin; cos and sin get no gradient (an error says so if they require one).

Each output is laid out in memory as its input is (``torch.empty_like``'s rule), as a rotation in place would
leave it: q and k made by ``view(B, T, H, D).transpose(1, 2)`` stay (B, T, H, D) in memory, so attention reads
them as they came from the projection and the ``transpose(1, 2).contiguous()`` after it copies nothing.
"""

from __future__ import annotations

import torch

from liger_compile.kernels import rope as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import check_float_tensor, check_same_device, define_op, fail

MAX_DIMS = 4


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The PyTorch definition (and the code the rewrite replaces), each product rounded to `dtype` (default: the
    promoted one, as eager rounds them; backward rounds to the input's)."""
    dtype = dtype or result_dtype(x, cos)
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    out = (rotated * cos).to(dtype) + (rotate_half(rotated) * sin).to(dtype)
    return torch.cat((out, passed.to(dtype)), -1) if passed.shape[-1] else out


def result_dtype(x: torch.Tensor, cos: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, cos.dtype)


def transposed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin' with ``rope(dy, cos, sin')`` = the gradient of ``rope(x, cos, sin)``: ``cat(-s2, -s1)``."""
    s1, s2 = sin.chunk(2, -1)
    return torch.cat((-s2, -s1), -1)


def _check(op: str, tensors: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in {**tensors, "cos": cos, "sin": sin}.items():
        check_float_tensor(op, name, t)
        if not 1 <= t.dim() <= MAX_DIMS:
            fail(op, f"{name} must have 1 to {MAX_DIMS} dims, got shape {tuple(t.shape)}")
    check_same_device(op, **tensors, cos=cos, sin=sin)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        fail(op, f"{' and '.join(tensors)} must have one dtype, got {dtypes}")
    if cos.dtype != sin.dtype:
        fail(op, f"cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")
    if cos.shape != sin.shape:
        fail(op, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    rotary_dim = cos.shape[-1]
    for name, t in tensors.items():
        if rotary_dim == 0 or rotary_dim % 2 or rotary_dim > t.shape[-1]:
            fail(op, f"cos/sin's last dim (rotary_dim {rotary_dim}) must be even, positive and at most "
                     f"{name}'s head_dim {t.shape[-1]}")
        leading = cos.shape[:-1]
        try:
            fits = torch.broadcast_shapes(leading, t.shape[:-1]) == t.shape[:-1]
        except RuntimeError:
            fits = False
        if not fits:
            fail(op, f"cos/sin {tuple(cos.shape)} must broadcast to {name}'s leading dims {tuple(t.shape[:-1])}")


def _padded(shape) -> tuple:
    return (1,) * (MAX_DIMS - len(shape)) + tuple(shape)


def position_sizes(q_shape, k_shape, cos_shape, differing) -> tuple[tuple, tuple]:
    """The sizes of q's and k's two position dims, the leading dims other than the heads dim (see
    `liger_compile.kernels.rope.heads_dim`;
    `differing`: the dims of the unpadded shapes where q and k differ): q and k of one rope_pair must agree on
    them."""
    offset = MAX_DIMS - len(q_shape)
    heads = kernels.heads_dim(_padded(cos_shape), [d + offset for d in differing])
    return tuple(tuple(padded[d] for d in range(3) if d != heads) for padded in (_padded(q_shape), _padded(k_shape)))


def _check_pair_layout(op: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> None:
    if q.dim() != k.dim() or q.shape[-1] != k.shape[-1]:
        fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must have one number of dims and one head_dim")
    differing = [d for d in range(q.dim()) if q.shape[d] != k.shape[d]]
    q_sizes, k_sizes = position_sizes(q.shape, k.shape, cos.shape, differing)
    if q_sizes != k_sizes:
        fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} may differ only in the heads dim, the one along "
                 f"which cos {tuple(cos.shape)} is constant")


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.view(_padded(t.shape))


def physical_layout(t: torch.Tensor) -> list[int]:
    """t's dims from outermost to innermost in memory (``torch.empty_permuted``'s ``physical_layout``)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _check_layout(op: str, name: str, layout: list[int], tensor_name: str, t: torch.Tensor) -> None:
    if sorted(layout) != list(range(t.dim())):
        fail(op, f"{name} must be a permutation of {tensor_name}'s {t.dim()} dims, got {layout}")


def _rotate(xs, cos, sin, layouts, dtype: torch.dtype, backward: bool):
    """Rotated copies of `xs` (one or two tensors) in `dtype`, laid out in memory as `layouts` say, by one kernel
    launch or the reference."""
    outs = tuple(torch.empty_permuted(x.shape, layout, dtype=dtype, device=x.device)
                 for x, layout in zip(xs, layouts))
    if not can_launch(xs[0]):
        sin = transposed_sin(sin) if backward else sin
        for x, out in zip(xs, outs):
            out.copy_(rope_reference(x, cos, sin, dtype))
        return outs
    if cos.stride() != sin.stride():  # the kernel indexes both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    q, k = (_as_4d(x) for x in xs) if len(xs) == 2 else (_as_4d(xs[0]), None)
    q_out, k_out = (_as_4d(o) for o in outs) if len(outs) == 2 else (_as_4d(outs[0]), None)
    kernels.rope(q, k, _as_4d(cos), _as_4d(sin), q_out, k_out, backward=backward)
    return outs


def _check_no_cos_grad(op: str, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if cos.requires_grad or sin.requires_grad:
        fail(op, "cos and sin get no gradient from this op, but one of them requires grad: detach them, or keep "
                 "the PyTorch code for learned rotary embeddings")


# Outputs and input gradients take the layout of the tensors they stand for (see the module docstring), so
# that the backward of the ``view(B, T, H, D).transpose(1, 2)`` that made q is free too.
@define_op("rope")
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check("rope", {"x": x}, cos, sin)
    (out,) = _rotate((x,), cos, sin, [physical_layout(x)], result_dtype(x, cos), backward=False)
    return out


@define_op("rope_backward")
def _rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: list[int],
                   dtype: torch.dtype) -> torch.Tensor:
    """dx in `dtype` (x's), laid out as `layout` says."""
    _check("rope_backward", {"dy": dy}, cos, sin)
    _check_layout("rope_backward", "layout", layout, "dy", dy)
    (dx,) = _rotate((dy,), cos, sin, [layout], dtype, backward=True)
    return dx


@define_op("rope_pair")
def _rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    _check("rope_pair", {"q": q, "k": k}, cos, sin)
    _check_pair_layout("rope_pair", q, k, cos)
    return _rotate((q, k), cos, sin, [physical_layout(q), physical_layout(k)], result_dtype(q, cos), backward=False)


@define_op("rope_pair_backward")
def _rope_pair_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_layout: list[int], k_layout: list[int], dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    _check("rope_pair_backward", {"dq": dq, "dk": dk}, cos, sin)
    _check_pair_layout("rope_pair_backward", dq, dk, cos)
    _check_layout("rope_pair_backward", "q_layout", q_layout, "dq", dq)
    _check_layout("rope_pair_backward", "k_layout", k_layout, "dk", dk)
    return _rotate((dq, dk), cos, sin, [q_layout, k_layout], dtype, backward=True)


def _setup_context(ctx, inputs, output):
    *rotated, cos, sin = inputs
    _check_no_cos_grad("rope_pair" if len(rotated) == 2 else "rope", cos, sin)
    ctx.save_for_backward(cos, sin)
    ctx.layouts = [physical_layout(t) for t in rotated]
    ctx.dtype = rotated[0].dtype


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.liger.rope_backward(dy, cos, sin, *ctx.layouts, ctx.dtype), None, None


def _pair_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.liger.rope_pair_backward(dq, dk, cos, sin, *ctx.layouts, ctx.dtype)
    return dq, dk, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)
_rope_pair.register_autograd(_pair_backward, setup_context=_setup_context)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on x's first ``cos.shape[-1]`` columns, the rest passed through."""
    return torch.ops.liger.rope(x, cos, sin)


def rope_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope` of q and of k with one kernel launch (q and k may have different head counts)."""
    return torch.ops.liger.rope_pair(q, k, cos, sin)
