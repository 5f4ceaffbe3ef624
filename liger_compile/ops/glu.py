"""Gated activations (SwiGLU, GeGLU) as torch.library custom ops.

Public ops, differentiable in both inputs:

- ``torch.ops.liger.swiglu(a, b)`` = ``F.silu(a) * b``
- ``torch.ops.liger.geglu(a, b, approximate="tanh")`` = ``F.gelu(a, approximate=approximate) * b``
  (``"tanh"`` as in Gemma and Liger-Kernel, or ``"none"`` for the exact erf form)

Both are wrappers over ``liger::gated_activation(a, b, activation)``, which the rewrites call, and
``liger::gated_activation_packed(gate_up, activation)`` takes the output of one fused projection whose halves are
``a, b = gate_up.chunk(2, -1)`` (Phi-3 and others) without materialising the halves, forward or backward.

``liger::gated_linear(a, b, weight, activation)`` is ``F.linear(act(a) * b, weight)``, the gated MLP's down
projection included: its backward computes the product again in the same kernel pass as the activation's
gradients, where the weight gradient needs it, instead of in a pass of its own, and writes it over the gradient it
has just read, which backward owns. Nothing but the inputs is saved.

Outputs round like the eager code: the activation's result is rounded to the input dtype before the multiply.
Backward saves only the inputs and recomputes the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liger_compile.kernels import glu as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops._library import as_rows, check_float_tensor, check_same_device, define_op, fail

ACTIVATIONS = kernels.ACTIVATIONS
_OP = "gated_activation"
_PACKED_OP = "gated_activation_packed"


def _check_activation(op: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        fail(op, f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_pair(op: str, a: torch.Tensor, b: torch.Tensor, names=("a", "b")) -> None:
    check_float_tensor(op, names[0], a)
    check_float_tensor(op, names[1], b)
    check_same_device(op, **{names[0]: a, names[1]: b})
    if a.shape != b.shape:
        fail(op, f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have one shape "
                 "(broadcasting is not supported)")
    if a.dtype != b.dtype:
        fail(op, f"{names[0]} ({a.dtype}) and {names[1]} ({b.dtype}) must have one dtype")
    if a.dim() == 0:
        fail(op, f"{names[0]} must have at least one dim")


def _halves(op: str, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor(op, "gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        fail(op, f"gate_up's last dim must be even (two halves), got shape {tuple(gate_up.shape)}")
    return gate_up.chunk(2, -1)


def activation_reference(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if activation == "gelu_tanh" else "none")


def gated_activation_reference(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    """The PyTorch definition of the op (and the code the rewrite replaces)."""
    return activation_reference(a, activation) * b


def gated_activation_backward_reference(dy, a, b, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients eager autograd gives for act(a) * b, with the same aten backward ops: (da, db)."""
    d_activated = dy * b
    if activation == "silu":
        da = torch.ops.aten.silu_backward(d_activated, a)
    else:
        da = torch.ops.aten.gelu_backward(d_activated, a, approximate="tanh" if activation == "gelu_tanh" else "none")
    return da, dy * activation_reference(a, activation)


def _rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [as_rows(t) for t in tensors]


def _forward(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    """act(a) * b by the kernel or the reference; `a` and `b` may be views (the halves of a packed input)."""
    if not can_launch(a):
        return gated_activation_reference(a, b, activation).contiguous()
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    kernels.glu_forward(*_rows(a, b, y), activation)
    return y


@define_op("gated_activation")
def _gated_activation(a: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(_OP, activation)
    _check_pair(_OP, a, b)
    return _forward(a, b, activation)


def _backward_kernels(op: str, dy, a, b, activation: str, y=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) by the kernel or the reference, and the product act(a) * b written into `y` if given."""
    _check_pair(op, dy, a, names=("dy", "a"))
    if not can_launch(a):
        da, db = gated_activation_backward_reference(dy, a, b, activation)
        if y is not None:
            y.copy_(gated_activation_reference(a, b, activation))
        return da.contiguous(), db.contiguous()
    da, db = (torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(2))
    kernels.glu_backward(*_rows(dy, a, b, da, db), activation, y=None if y is None else as_rows(y))
    return da, db


@define_op("gated_activation_backward")
def _gated_activation_backward(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_kernels(f"{_OP}_backward", dy, a, b, activation)


@define_op("gated_activation_backward_and_output_", mutates_args=("dy",))
def _gated_activation_backward_and_output_(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation's gradients (da, db), from one read of `a`, `b` and `dy`, and its output act(a) * b written
    over `dy`: a caller that owns `dy` and needs the product next (a linear layer's weight gradient) holds one
    intermediate-sized buffer fewer than with a separate product output."""
    op = f"{_OP}_backward_and_output_"
    if not dy.is_contiguous():  # the kernel writes through a 2-D view of dy, which only a contiguous dy has
        fail(op, f"dy must be contiguous, got strides {dy.stride()} for shape {tuple(dy.shape)}")
    return _backward_kernels(op, dy, a, b, activation, y=dy)


@define_op("gated_activation_packed")
def _gated_activation_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(_PACKED_OP, activation)
    return _forward(*_halves(_PACKED_OP, gate_up), activation)


@define_op("gated_activation_packed_backward")
def _gated_activation_packed_backward(dy: torch.Tensor, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    op = f"{_PACKED_OP}_backward"
    a, b = _halves(op, gate_up)
    _check_pair(op, dy, a, names=("dy", "gate_up's halves"))
    if not can_launch(gate_up):
        return torch.cat(gated_activation_backward_reference(dy, a, b, activation), -1).contiguous()
    d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    da, db = d_gate_up.chunk(2, -1)
    kernels.glu_backward(*_rows(dy, a, b), *(t.view(-1, t.shape[-1]) for t in (da, db)), activation)
    return d_gate_up


_LINEAR_OP = "gated_linear"


@define_op(_LINEAR_OP)
def _gated_linear(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(_LINEAR_OP, activation)
    _check_pair(_LINEAR_OP, a, b)
    check_float_tensor(_LINEAR_OP, "weight", weight)
    check_same_device(_LINEAR_OP, a=a, weight=weight)
    if weight.dim() != 2 or weight.shape[1] != a.shape[-1] or weight.dtype != a.dtype:
        fail(_LINEAR_OP, f"weight must be (out_features, {a.shape[-1]}) of a's dtype {a.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    return F.linear(_forward(a, b, activation), weight)


def _setup_context(ctx, inputs, output):
    *tensors, activation = inputs
    ctx.save_for_backward(*tensors)
    ctx.activation = activation


def _backward(ctx, dy):
    a, b = ctx.saved_tensors
    da, db = torch.ops.liger.gated_activation_backward(dy, a, b, ctx.activation)
    return da, db, None


def _packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.liger.gated_activation_packed_backward(dy, gate_up, ctx.activation), None


def _linear_backward(ctx, d_out):
    """As autograd differentiates F.linear (d_input = d_out @ weight, d_weight = d_out^T @ input over the rows),
    with the linear's input, the product, written by the activation's backward kernel."""
    a, b, weight = ctx.saved_tensors
    inputs_need, weight_needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    d_out_rows = d_out.reshape(-1, d_out.shape[-1])
    da = db = d_weight = None
    if inputs_need:
        dy = (d_out_rows @ weight).view(a.shape)
        if weight_needs:
            da, db = torch.ops.liger.gated_activation_backward_and_output_(dy, a, b, ctx.activation)
            y = dy
        else:
            da, db = torch.ops.liger.gated_activation_backward(dy, a, b, ctx.activation)
    elif weight_needs:
        y = torch.ops.liger.gated_activation(a, b, ctx.activation)
    if weight_needs:
        d_weight = d_out_rows.t() @ y.reshape(-1, y.shape[-1])
    return da, db, d_weight, None


_gated_activation.register_autograd(_backward, setup_context=_setup_context)
_gated_linear.register_autograd(_linear_backward, setup_context=_setup_context)
_gated_activation_packed.register_autograd(_packed_backward, setup_context=_setup_context)

torch.library.define("liger::swiglu", "(Tensor a, Tensor b) -> Tensor")
torch.library.define("liger::geglu", "(Tensor a, Tensor b, str approximate='tanh') -> Tensor")


@torch.library.impl("liger::swiglu", "CompositeImplicitAutograd")
def _swiglu(a, b):
    return torch.ops.liger.gated_activation(a, b, "silu")


@torch.library.impl("liger::geglu", "CompositeImplicitAutograd")
def _geglu(a, b, approximate="tanh"):
    if approximate not in ("tanh", "none"):
        fail("geglu", f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return torch.ops.liger.gated_activation(a, b, "gelu_tanh" if approximate == "tanh" else "gelu")


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.silu(a) * b``; differentiable in `a` and `b`."""
    return torch.ops.liger.swiglu(a, b)


def geglu(a: torch.Tensor, b: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``F.gelu(a, approximate=approximate) * b``; differentiable in `a` and `b`."""
    return torch.ops.liger.geglu(a, b, approximate)


def gated_linear(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``F.linear(act(a) * b, weight)``: a gated MLP's activation and down projection (no bias)."""
    return torch.ops.liger.gated_linear(a, b, weight, activation)


def gated_activation_packed(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(a) * b`` with ``a, b = gate_up.chunk(2, -1)``; `activation` is one of `ACTIVATIONS`."""
    return torch.ops.liger.gated_activation_packed(gate_up, activation)
