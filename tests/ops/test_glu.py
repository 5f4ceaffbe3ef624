"""torch.ops.liger gated activations (swiglu, geglu, gated_activation[_packed], gated_linear): opcheck,
forward/backward against autograd of the eager code, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError
from liger_compile.ops.glu import ACTIVATIONS
from tests.conftest import DEVICE
from tests.helpers import assert_close

EAGER = {
    "silu": F.silu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "gelu": F.gelu,
}
DTYPES = [torch.float32, torch.bfloat16]


def make_pair(shape, dtype, seed=0):
    torch.manual_seed(seed)
    a = (torch.randn(shape, device=DEVICE) * 2).to(dtype).requires_grad_()
    b = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    return a, b


def eager_result(a, b, activation, dy):
    """Output and (da, db) from autograd through the eager code, on detached copies."""
    a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (a, b))
    y = EAGER[activation](a_ref) * b_ref
    y.backward(dy)
    return y, a_ref.grad, b_ref.grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 100), (2, 3, 4, 64)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_eager(op_path, activation, dtype, shape):
    a, b = make_pair(shape, dtype)
    y = torch.ops.liger.gated_activation(a, b, activation)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, da_ref, db_ref = eager_result(a, b, activation, dy)
    assert y.shape == a.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, y_ref)
    assert_close(a.grad, da_ref)
    assert_close(b.grad, db_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_packed_matches_chunked_eager(op_path, activation, dtype):
    torch.manual_seed(1)
    gate_up = (torch.randn(2, 5, 2 * 48, device=DEVICE) * 2).to(dtype).requires_grad_()
    y = torch.ops.liger.gated_activation_packed(gate_up, activation)
    dy = torch.randn_like(y)
    y.backward(dy)
    reference = gate_up.detach().clone().requires_grad_()
    gate, up = reference.chunk(2, -1)
    y_ref = EAGER[activation](gate) * up
    y_ref.backward(dy)
    assert y.shape == (2, 5, 48) and gate_up.grad.shape == gate_up.shape
    assert_close(y, y_ref)
    assert_close(gate_up.grad, reference.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("needs", ["all", "inputs", "weight"])
def test_gated_linear_matches_eager(op_path, activation, dtype, shape, needs):
    """F.linear(act(a) * b, weight): the output and each gradient asked for, as autograd gives them eagerly."""
    a, b = make_pair(shape, dtype)
    weight = (torch.randn(11, shape[-1], device=DEVICE) / shape[-1] ** 0.5).to(dtype).requires_grad_()
    a.requires_grad_(needs != "weight")
    b.requires_grad_(needs != "weight")
    weight.requires_grad_(needs != "inputs")
    out = liger_compile.ops.gated_linear(a, b, weight, activation)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    references = [t.detach().clone().requires_grad_(t.requires_grad) for t in (a, b, weight)]
    out_ref = F.linear(EAGER[activation](references[0]) * references[1], references[2])
    out_ref.backward(d_out)
    assert out.shape == (*shape[:-1], 11) and out.dtype == dtype
    assert_close(out, out_ref)
    for tensor, reference in zip((a, b, weight), references):
        assert (tensor.grad is None) == (reference.grad is None)
        if reference.grad is not None:
            # The weight's gradient sums products over rows, cancelling: in bf16 an ulp of the product (the
            # interpreter rounds it towards zero) moves small sums far in relative terms, so bf16 compares
            # against the gradient's scale.
            scale = reference.grad.abs().max().item() if dtype == torch.bfloat16 else 0.0
            assert_close(tensor.grad, reference.grad, atol=max(2e-2 * scale, 1e-5) if scale else None)


@pytest.mark.parametrize("shape", [(4, 70), (2, 3, 40)])
def test_backward_and_output_writes_the_forward_product_over_dy(op_path, shape):
    a, b = (t.detach() for t in make_pair(shape, torch.bfloat16))
    dy = torch.randn_like(a)
    da_ref, db_ref = torch.ops.liger.gated_activation_backward(dy, a, b, "silu")
    da, db = torch.ops.liger.gated_activation_backward_and_output_(dy, a, b, "silu")
    assert torch.equal(dy, torch.ops.liger.gated_activation(a, b, "silu"))
    assert torch.equal(da, da_ref) and torch.equal(db, db_ref)


def test_backward_and_output_refuses_a_dy_it_cannot_write_through():
    a, b = (t.detach() for t in make_pair((6, 8), torch.float32))
    with pytest.raises(ValueError, match=r"gated_activation_backward_and_output_: dy must be contiguous"):
        torch.ops.liger.gated_activation_backward_and_output_(torch.randn(8, 6, device=DEVICE).t(), a, b, "silu")


def test_public_wrappers_pick_the_activation(op_path):
    a, b = make_pair((4, 24), torch.float32)
    assert_close(liger_compile.ops.swiglu(a, b), F.silu(a) * b)
    assert_close(liger_compile.ops.geglu(a, b), F.gelu(a, approximate="tanh") * b)
    assert_close(liger_compile.ops.geglu(a, b, approximate="none"), F.gelu(a) * b)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs_and_gradients(op_path, layout):
    torch.manual_seed(3)
    if layout == "transposed":  # last dim not unit-stride: copied
        a, b = (torch.randn(40, 6, device=DEVICE).t().requires_grad_() for _ in range(2))
    else:  # unit stride, rows not evenly spaced: read with their row stride
        a, b = (torch.randn(2, 6, 64, device=DEVICE)[:, :, :40].requires_grad_() for _ in range(2))
    y = torch.ops.liger.swiglu(a, b)
    dy = torch.randn(y.shape[::-1], device=DEVICE).transpose(0, -1)
    y.backward(dy)
    y_ref, da_ref, db_ref = eager_result(a, b, "silu", dy)
    assert_close(y, y_ref)
    assert_close(a.grad, da_ref)
    assert_close(b.grad, db_ref)


def test_gradient_only_for_one_input(op_path):
    a, b = make_pair((5, 33), torch.float32)
    torch.ops.liger.swiglu(a.detach(), b).sum().backward()
    _, _, db_ref = eager_result(a, b, "silu", torch.ones(5, 33, device=DEVICE))
    assert_close(b.grad, db_ref)


SAMPLES = [((3, 37), torch.float32, "silu"), ((2, 5, 64), torch.bfloat16, "gelu_tanh"),
           ((4, 8), torch.float16, "gelu")]


@pytest.mark.parametrize("shape,dtype,activation", SAMPLES)
def test_opcheck(op_path, shape, dtype, activation):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("on CPU eager runs the interpreted kernel and traced graphs the reference, which round "
                    "differently (the interpreter truncates to bf16); the GPU suite runs opcheck through the kernels")
    a, b = make_pair(shape, dtype)
    opcheck(torch.ops.liger.gated_activation.default, (a, b, activation))
    opcheck(torch.ops.liger.gated_activation_backward.default,
            (torch.randn_like(a), a.detach(), b.detach(), activation))
    gate_up = torch.cat([a, b], -1).detach().requires_grad_()
    opcheck(torch.ops.liger.gated_activation_packed.default, (gate_up, activation))
    opcheck(torch.ops.liger.gated_activation_packed_backward.default,
            (torch.randn_like(a), gate_up.detach(), activation))
    opcheck(torch.ops.liger.gated_activation_backward_and_output_.default,
            (torch.randn_like(a), a.detach(), b.detach(), activation))
    weight = torch.randn(5, shape[-1], device=DEVICE, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.liger.gated_linear.default, (a, b, weight, activation))
    opcheck(torch.ops.liger.swiglu.default, (a, b))
    opcheck(torch.ops.liger.geglu.default, (a, b, "tanh"))


def test_compiles_with_dynamic_shapes_without_recompiling():
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    fn = torch.compile(lambda a, b: torch.ops.liger.swiglu(a, b), backend=counting_backend, dynamic=True,
                       fullgraph=True)
    for rows in (3, 5, 11):
        a, b = torch.randn(rows, 32, device=DEVICE), torch.randn(rows, 32, device=DEVICE)
        assert_close(fn(a, b), F.silu(a) * b)
    assert len(calls) == 1


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.liger.swiglu(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32)),
     "liger::gated_activation: a must be float32, float16 or bfloat16"),
    (lambda: torch.ops.liger.swiglu(torch.ones(2, 8), torch.ones(1, 8)),
     r"liger::gated_activation: a \(2, 8\) and b \(1, 8\) must have one shape"),
    (lambda: torch.ops.liger.swiglu(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.bfloat16)),
     "liger::gated_activation: a .* and b .* must have one dtype"),
    (lambda: torch.ops.liger.gated_activation(torch.ones(2, 8), torch.ones(2, 8), "relu"),
     "liger::gated_activation: activation must be one of"),
    (lambda: torch.ops.liger.geglu(torch.ones(2, 8), torch.ones(2, 8), "sigmoid"),
     "liger::geglu: approximate must be 'tanh' or 'none'"),
    (lambda: torch.ops.liger.gated_activation_packed(torch.ones(2, 7), "silu"),
     "liger::gated_activation_packed: gate_up's last dim must be even"),
    (lambda: torch.ops.liger.gated_linear(torch.ones(2, 8), torch.ones(2, 8), torch.ones(3, 7), "silu"),
     r"liger::gated_linear: weight must be \(out_features, 8\) of a's dtype"),
    (lambda: torch.ops.liger.gated_linear(torch.ones(2, 8), torch.ones(2, 8), torch.ones(3, 8, dtype=torch.bfloat16),
                                          "silu"),
     r"liger::gated_linear: weight must be \(out_features, 8\) of a's dtype torch.float32, got \(3, 8\) "
     "torch.bfloat16"),
])
def test_bad_input_names_the_op(call, message):
    with pytest.raises(LigerOpError, match=message):
        call()


def test_mismatched_devices_are_named():
    if DEVICE == "cpu":
        pytest.skip("needs a second device")
    with pytest.raises(LigerOpError, match="liger::gated_activation: all tensors must be on one device"):
        torch.ops.liger.swiglu(torch.ones(2, 8, device=DEVICE), torch.ones(2, 8))
