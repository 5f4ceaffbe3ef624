"""torch.ops.liger.layer_norm: opcheck, forward/backward against autograd of F.layer_norm, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError
from liger_compile.ops.layer_norm import layer_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error


def make_inputs(shape, dtype, *, affine_dtype=None, weight=True, bias=True, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(shape, device=DEVICE) * 3 - 1).to(dtype).requires_grad_()

    def parameter(present):
        if not present:
            return None
        return torch.randn(shape[-1], device=DEVICE).to(affine_dtype or dtype).requires_grad_()

    return x, parameter(weight), parameter(bias)


def eager_grads(x, weight, bias, eps, dy):
    """Autograd through torch's own layer_norm: independent of the op's backward formula. It runs in fp32 and
    rounds once, as torch's layer_norm does inside for 16-bit inputs (CUDA's refuses mixed dtypes)."""
    x_ref, w_ref, b_ref = (None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = F.layer_norm(x_ref.float(), x.shape[-1:], *(None if t is None else t.float() for t in (w_ref, b_ref)), eps)
    y = y.to(x.dtype)
    y.backward(dy)
    return y, x_ref.grad, None if w_ref is None else w_ref.grad, None if b_ref is None else b_ref.grad


def gradient_tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 100), (2, 3, 4, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_forward_and_backward_match_torch(op_path, dtype, shape, affine):
    x, weight, bias = make_inputs(shape, dtype, weight=affine != "none", bias=affine == "weight_bias")
    y = torch.ops.liger.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = eager_grads(x, weight, bias, 1e-5, dy)

    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert_close(y, y_ref)
    assert_relative_error(x.grad, dx_ref, gradient_tolerance(dtype))
    for param, expected in ((weight, dw_ref), (bias, db_ref)):
        if param is not None:
            assert param.grad.dtype == param.dtype
            assert_relative_error(param.grad, expected, gradient_tolerance(dtype))


def test_fp32_affine_on_bf16_input_keeps_each_dtype(op_path):
    x, weight, bias = make_inputs((4, 48), torch.bfloat16, affine_dtype=torch.float32)
    y = liger_compile.ops.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = eager_grads(x, weight, bias, 1e-5, dy)
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == bias.grad.dtype == torch.float32
    assert_close(y, y_ref)
    assert_relative_error(x.grad, dx_ref, 1e-2)
    assert_relative_error(weight.grad, dw_ref, 1e-2)
    assert_relative_error(bias.grad, db_ref, 1e-2)


def test_non_contiguous_inputs_and_gradients(op_path):
    torch.manual_seed(3)
    x = torch.randn(40, 6, device=DEVICE).t().requires_grad_()  # last dim not unit-stride: copied
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    y = torch.ops.liger.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn(y.shape[::-1], device=DEVICE).transpose(0, -1)  # a non-contiguous cotangent
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = eager_grads(x, weight, bias, 1e-5, dy)
    assert_close(y, y_ref)
    assert_close(x.grad, dx_ref)
    assert_close(weight.grad, dw_ref)
    assert_close(bias.grad, db_ref)


def test_gradient_only_for_the_bias(op_path):
    x, weight, bias = make_inputs((5, 33), torch.float32)
    x, weight = x.detach(), weight.detach()
    torch.ops.liger.layer_norm(x, weight, bias, 1e-5).sum().backward()
    assert_close(bias.grad, torch.full((33,), 5.0, device=DEVICE))


SAMPLES = [
    ((3, 37), torch.float32, None),
    ((2, 5, 64), torch.bfloat16, torch.bfloat16),
    ((2, 5, 64), torch.bfloat16, torch.float32),
    ((4, 8), torch.float16, torch.float16),
]


@pytest.mark.parametrize("shape,dtype,affine_dtype", SAMPLES)
def test_opcheck(op_path, shape, dtype, affine_dtype):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("on CPU eager runs the interpreted kernel and traced graphs the reference, which round "
                    "differently (the interpreter truncates to bf16): the GPU suite runs opcheck through the kernels")
    affine = affine_dtype is not None
    x, weight, bias = make_inputs(shape, dtype, affine_dtype=affine_dtype, weight=affine, bias=affine)
    args = (x, weight, bias, 1e-5)
    opcheck(torch.ops.liger.layer_norm.default, args)
    opcheck(torch.ops.liger.layer_norm_forward.default, args)
    y, mean, rstd = torch.ops.liger.layer_norm_forward(*args)
    opcheck(torch.ops.liger.layer_norm_backward.default,
            (torch.randn_like(y), x.detach(), None if weight is None else weight.detach(), mean.detach(),
             rstd.detach(), affine, affine))


def test_compiles_with_dynamic_shapes_without_recompiling():
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    fn = torch.compile(lambda x, w, b: torch.ops.liger.layer_norm(x, w, b, 1e-5), backend=counting_backend,
                       dynamic=True, fullgraph=True)
    weight, bias = torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)
    for rows in (3, 5, 11):
        x = torch.randn(rows, 32, device=DEVICE)
        assert_close(fn(x, weight, bias), layer_norm_reference(x, weight, bias, 1e-5)[0])
    assert len(calls) == 1


@pytest.mark.parametrize("make_args,message", [
    (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(8), None), "x must be float32, float16 or bfloat16"),
    (lambda: (torch.ones(2, 8), torch.ones(7), None), r"weight must have shape \(8,\)"),
    (lambda: (torch.ones(2, 8), None, torch.ones(2, 8)), r"bias must have shape \(8,\)"),
    (lambda: (torch.ones(2, 8), None, torch.ones(8, dtype=torch.float64)), "bias must be float32"),
    (lambda: (torch.ones(2, 0), None, None), "x must have a non-empty last dim"),
])
def test_bad_input_names_the_op(make_args, message):
    x, weight, bias = (None if t is None else t.to(DEVICE) for t in make_args())
    with pytest.raises(LigerOpError, match=f"liger::layer_norm: {message}"):
        torch.ops.liger.layer_norm(x, weight, bias, 1e-5)


def test_bad_eps_and_devices_are_refused():
    x = torch.ones(2, 8, device=DEVICE)
    with pytest.raises(LigerOpError, match="liger::layer_norm: eps must be a finite number"):
        torch.ops.liger.layer_norm(x, None, None, -1.0)
    other = "cpu" if DEVICE == "cuda" else "meta"
    with pytest.raises(LigerOpError, match="liger::layer_norm: all tensors must be on one device"):
        torch.ops.liger.layer_norm(x, None, torch.ones(8, device=other), 1e-5)


def test_output_can_be_modified_in_place(op_path):
    """Models write into a norm's output (XLM scales it by a mask in place): it must not be a view."""
    x, weight, bias = make_inputs((2, 3, 16), torch.float32)
    y = torch.ops.liger.layer_norm(x, weight, bias, 1e-5)
    y.mul_(2.0)
    y.sum().backward()
    _, dx_ref, _, _ = eager_grads(x, weight, bias, 1e-5, torch.full_like(y, 2.0))
    assert_close(x.grad, dx_ref)
