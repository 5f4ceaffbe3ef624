"""Gated-activation Triton kernels against the PyTorch reference (interpreted on CPU, natively on GPU)."""

import pytest
import torch

from liger_compile.kernels import glu as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.glu import gated_activation_backward_reference, gated_activation_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# Narrow rows (several rows per program), odd widths, and rows wider than one tile (several column blocks).
SHAPES = [(3, 37), (5, 100), (2, 3000)]
if DEVICE == "cuda":
    SHAPES += [(4099, 14336), (1021, 128)]


def run(a, b, dy, activation):
    y, y_again = torch.empty_like(a), torch.empty_like(a)
    da, db = torch.empty_like(a), torch.empty_like(a)
    kernels.glu_forward(a, b, y, activation)
    kernels.glu_backward(dy, a, b, da, db, activation, y=y_again)
    assert torch.equal(y_again, y)  # the product a backward writes for the next linear's weight gradient
    da_alone, db_alone = torch.empty_like(a), torch.empty_like(a)
    kernels.glu_backward(dy, a, b, da_alone, db_alone, activation)
    assert torch.equal(da_alone, da) and torch.equal(db_alone, db)
    return y, da, db


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_kernels_match_reference(rows, cols, dtype, activation):
    torch.manual_seed(rows * cols)
    a = (torch.randn(rows, cols, device=DEVICE) * 3).to(dtype)  # reaches both tails of the activation
    b, dy = (torch.randn(rows, cols, device=DEVICE).to(dtype) for _ in range(2))
    y, da, db = run(a, b, dy, activation)
    # fp32 against fp64 math (PyTorch's fp32 gelu-tanh itself is a few ulps off where 1 + tanh cancels);
    # 16-bit against eager in that dtype, whose roundings the kernel reproduces.
    reference_dtype = torch.float64 if dtype == torch.float32 else dtype
    a_ref, b_ref, dy_ref = (t.to(reference_dtype) for t in (a, b, dy))
    assert_close(y, gated_activation_reference(a_ref, b_ref, activation).to(dtype))
    da_ref, db_ref = gated_activation_backward_reference(dy_ref, a_ref, b_ref, activation)
    assert_close(da, da_ref.to(dtype))
    assert_close(db, db_ref.to(dtype))


def test_strided_halves_of_one_buffer():
    """The packed layout: a and b are the halves of each row of one tensor; gradients go into halves too."""
    torch.manual_seed(0)
    gate_up, dy = torch.randn(7, 2 * 50, device=DEVICE), torch.randn(7, 50, device=DEVICE)
    a, b = gate_up.chunk(2, -1)
    d_gate_up = torch.full_like(gate_up, float("nan"))
    y = torch.empty_like(dy)
    kernels.glu_forward(a, b, y, "silu")
    kernels.glu_backward(dy, a, b, *d_gate_up.chunk(2, -1), "silu")
    assert_close(y, gated_activation_reference(a, b, "silu"))
    assert_close(d_gate_up, torch.cat(gated_activation_backward_reference(dy, a, b, "silu"), -1))


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
def test_extreme_inputs_stay_finite_and_exact(activation):
    """Large |a|, where a naive exp or tanh overflows: values and derivatives must still be the limits."""
    a = torch.tensor([[-1e4, -300.0, -80.0, -20.0, 0.0, 20.0, 80.0, 300.0, 1e4]], device=DEVICE)
    b = torch.full_like(a, 1.5)
    dy = torch.full_like(a, 2.0)
    y, da, db = run(a, b, dy, activation)
    assert torch.isfinite(y).all() and torch.isfinite(da).all() and torch.isfinite(db).all()
    assert_close(y, gated_activation_reference(a, b, activation))
    da_ref, db_ref = gated_activation_backward_reference(dy, a, b, activation)
    assert_close(da, da_ref)
    assert_close(db, db_ref)
