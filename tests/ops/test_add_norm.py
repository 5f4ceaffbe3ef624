"""torch.ops.liger.add_rms_norm / add_layer_norm: (norm(x + residual), x + residual) against eager autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from liger_compile.ops import LigerOpError
from liger_compile.ops.rms_norm import rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error


def eager(norm, x, residual, weight, bias):
    """The unfused computation, through torch's autograd: h = x + residual, y = norm(h)."""
    h = x + residual
    if norm == "rms_norm":
        return rms_norm_reference(h, weight, 1e-6)[0], h
    return F.layer_norm(h.float(), h.shape[-1:], weight.float(), bias.float(), 1e-5).to(h.dtype), h


def fused(norm, x, residual, weight, bias):
    if norm == "rms_norm":
        return torch.ops.liger.add_rms_norm(x, residual, weight, 1e-6)
    return torch.ops.liger.add_layer_norm(x, residual, weight, bias, 1e-5)


def leaves(shape, dtype, seed=0):
    torch.manual_seed(seed)
    x, residual = (torch.randn(shape, device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(shape[-1], device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    return x, residual, weight, bias


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("h_used", [True, False], ids=["h_used", "h_unused"])
def test_forward_and_backward_match_eager(op_path, norm, dtype, shape, h_used):
    inputs = leaves(shape, dtype)
    references = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = fused(norm, *inputs)
    y_ref, h_ref = eager(norm, *references)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    ((y * dy).sum() + ((h * dh).sum() if h_used else 0)).backward()
    ((y_ref * dy).sum() + ((h_ref * dh).sum() if h_used else 0)).backward()

    assert not y._is_view() and not h._is_view()
    assert_close(h, h_ref)  # exact on GPUs; the interpreter truncates where it rounds to bf16
    if DEVICE == "cuda":
        assert torch.equal(h, h_ref)
    assert_close(y, y_ref)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for actual, expected in zip(inputs, references):  # RMSNorm has no bias: no gradient on either side
        assert (actual.grad is None) == (expected.grad is None)
        if expected.grad is not None:
            assert_relative_error(actual.grad, expected.grad, tolerance)
    assert torch.equal(inputs[0].grad, inputs[1].grad)  # one gradient for both operands of the sum


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_opcheck(op_path, norm):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("eager runs the interpreted kernel and traced graphs the reference: the GPU suite runs it")
    x, residual, weight, bias = leaves((2, 5, 64), torch.float32)
    if norm == "rms_norm":
        opcheck(torch.ops.liger.add_rms_norm_forward.default, (x, residual, weight, 1e-6, 0.0, "llama"))
    else:
        opcheck(torch.ops.liger.add_layer_norm_forward.default, (x, residual, weight, bias, 1e-5))


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_residual_must_match_x(norm):
    x, _, weight, bias = leaves((4, 8), torch.float32)
    with pytest.raises(LigerOpError, match=f"liger::add_{norm}: residual .* must match x"):
        fused(norm, x, torch.ones(8, device=DEVICE), weight, bias)
    with pytest.raises(LigerOpError, match=f"liger::add_{norm}: residual .* must match x"):
        fused(norm, x, torch.ones(4, 8, device=DEVICE, dtype=torch.bfloat16), weight, bias)
