"""torch.ops.liger.rms_norm: opcheck, forward/backward against autograd of the eager definition, errors."""

import pytest
import torch
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError
from liger_compile.ops.rms_norm import CASTING_MODES, rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error

DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(shape, dtype, *, weight_dtype=None, affine=True, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(shape, device=DEVICE) * 3 - 1).to(dtype).requires_grad_()
    weight = None
    if affine:
        weight = torch.randn(shape[-1], device=DEVICE).to(weight_dtype or dtype).requires_grad_()
    return x, weight


def eager_grads(x, weight, eps, offset, mode, dy):
    """Autograd through the eager definition: independent of the op's own backward formula."""
    x_ref = x.detach().clone().requires_grad_()
    w_ref = None if weight is None else weight.detach().clone().requires_grad_()
    y, _ = rms_norm_reference(x_ref, w_ref, eps, offset, mode)
    y.backward(dy)
    return y, x_ref.grad, None if w_ref is None else w_ref.grad


@pytest.mark.parametrize("mode", CASTING_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 100), (2, 3, 4, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
def test_forward_and_backward_match_eager(op_path, mode, dtype, shape, affine):
    x, weight = make_inputs(shape, dtype, affine=affine)
    offset = 1.0 if affine and mode == "gemma" else 0.0
    y = torch.ops.liger.rms_norm(x, weight, 1e-6, offset, mode)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = eager_grads(x, weight, 1e-6, offset, mode, dy)

    assert y.shape == x.shape and y.dtype == y_ref.dtype and y.is_contiguous()
    assert_close(y, y_ref)
    assert_relative_error(x.grad, dx_ref, 1e-5 if dtype == torch.float32 else 1e-2)
    if affine:
        assert weight.grad.dtype == weight.dtype
        assert_relative_error(weight.grad, dw_ref, 1e-5 if dtype == torch.float32 else 1e-2)


def test_llama_mode_promotes_to_the_weight_dtype(op_path):
    x, weight = make_inputs((4, 48), torch.bfloat16, weight_dtype=torch.float32)
    y = liger_compile.ops.rms_norm(x, weight, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = eager_grads(x, weight, 1e-5, 0.0, "llama", dy)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, dtype=torch.bfloat16)
    assert_relative_error(x.grad, dx_ref, 1e-2)
    assert_relative_error(weight.grad, dw_ref, 1e-2)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs_and_gradients(op_path, layout):
    torch.manual_seed(3)
    if layout == "transposed":  # last dim not unit-stride: copied
        x = torch.randn(40, 6, device=DEVICE).t().requires_grad_()
    else:  # unit stride, rows not evenly spaced: read through a copy or with its row stride
        x = torch.randn(2, 6, 64, device=DEVICE)[:, :, :40].requires_grad_()
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    y = torch.ops.liger.rms_norm(x, weight, 1e-6)
    dy = torch.randn(y.shape[::-1], device=DEVICE).transpose(0, -1)  # a non-contiguous cotangent
    y.backward(dy)
    y_ref, dx_ref, dw_ref = eager_grads(x, weight, 1e-6, 0.0, "llama", dy)
    assert_close(y, y_ref)
    assert_close(x.grad, dx_ref)
    assert_close(weight.grad, dw_ref)


def test_gradient_only_for_the_weight(op_path):
    x, weight = make_inputs((5, 33), torch.float32)
    x = x.detach()
    torch.ops.liger.rms_norm(x, weight, 1e-6).sum().backward()
    _, _, dw_ref = eager_grads(x, weight, 1e-6, 0.0, "llama", torch.ones(5, 33, device=DEVICE))
    assert_close(weight.grad, dw_ref)


SAMPLES = [
    ((3, 37), torch.float32, None, "llama", 0.0),
    ((2, 5, 64), torch.bfloat16, torch.bfloat16, "gemma", 1.0),
    ((2, 5, 64), torch.bfloat16, torch.float32, "llama", 0.0),
    ((4, 8), torch.float16, torch.float16, "none", 0.0),
]


@pytest.mark.parametrize("shape,dtype,weight_dtype,mode,offset", SAMPLES)
def test_opcheck(op_path, shape, dtype, weight_dtype, mode, offset):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("on CPU eager runs the interpreted kernel and traced graphs the reference, which round "
                    "differently (the interpreter truncates to bf16): opcheck's eager-vs-traced comparison "
                    "would compare two implementations; the GPU suite runs opcheck through the kernels")
    x, weight = make_inputs(shape, dtype, weight_dtype=weight_dtype, affine=weight_dtype is not None)
    args = (x, weight, 1e-6, offset, mode)
    opcheck(torch.ops.liger.rms_norm.default, args)
    opcheck(torch.ops.liger.rms_norm_forward.default, args)
    y, rstd = torch.ops.liger.rms_norm_forward(*args)
    dy = torch.randn_like(y)
    opcheck(torch.ops.liger.rms_norm_backward.default,
            (dy, x.detach(), None if weight is None else weight.detach(), rstd.detach(), offset, mode,
             weight is not None))


def test_compiles_with_dynamic_shapes_without_recompiling():
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    fn = torch.compile(lambda x, w: torch.ops.liger.rms_norm(x, w, 1e-6), backend=counting_backend,
                       dynamic=True, fullgraph=True)
    weight = torch.randn(32, device=DEVICE)
    for rows in (3, 5, 11):
        x = torch.randn(rows, 32, device=DEVICE)
        assert_close(fn(x, weight), rms_norm_reference(x, weight, 1e-6)[0])
    assert len(calls) == 1


@pytest.mark.parametrize("make_args,message", [
    (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(8)), "x must be float32, float16 or bfloat16"),
    (lambda: (torch.ones(2, 8), torch.ones(7)), r"weight must have shape \(8,\)"),
    (lambda: (torch.ones(2, 8), torch.ones(8, dtype=torch.float64)), "weight must be float32"),
    (lambda: (torch.ones(2, 0), None), "x must have a non-empty last dim"),
])
def test_bad_input_names_the_op(make_args, message):
    x, weight = make_args()
    with pytest.raises(LigerOpError, match=f"liger::rms_norm: {message}"):
        torch.ops.liger.rms_norm(x.to(DEVICE), None if weight is None else weight.to(DEVICE), 1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(casting_mode="fp8"), "casting_mode must be one of"),
    (dict(eps=-1.0), "eps must be a finite number"),
    (dict(eps=float("nan")), "eps must be a finite number"),
    (dict(weight=None, offset=1.0), "offset=1.0 needs a weight"),
    (dict(weight=torch.ones(8, dtype=torch.bfloat16), casting_mode="none"), "casting_mode 'none' computes in x's dtype"),
])
def test_bad_arguments_name_the_op(kwargs, message):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8), eps=1e-6, offset=0.0, casting_mode="llama") | kwargs
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(LigerOpError, match=f"liger::rms_norm: {message}"):
        torch.ops.liger.rms_norm(*args.values())


def test_tensors_on_different_devices_are_refused():
    other = "cpu" if DEVICE == "cuda" else "meta"
    with pytest.raises(LigerOpError, match="liger::rms_norm: all tensors must be on one device"):
        torch.ops.liger.rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(8, device=other), 1e-6)


def test_output_can_be_modified_in_place(op_path):
    """Models write into a norm's output: it must not be a view (autograd forbids in-place ops on those)."""
    x, weight = make_inputs((2, 3, 16), torch.float32)
    y = torch.ops.liger.rms_norm(x, weight, 1e-6)
    y.mul_(2.0)
    y.sum().backward()
    _, dx_ref, _ = eager_grads(x, weight, 1e-6, 0.0, "llama", torch.full_like(y, 2.0))
    assert_close(x.grad, dx_ref)
