"""LayerNorm Triton kernels against the PyTorch reference (under TRITON_INTERPRET=1 on CPU, natively on GPU)."""

import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import norm as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.layer_norm import layer_norm_backward_reference, layer_norm_reference
from liger_compile.ops.rms_norm import rms_norm_backward_reference, rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error
from tests.kernels.test_rms_norm import SHAPES  # the same kernels: the same shapes and paths

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("rows,hidden,max_block_n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_kernels_match_reference(rows, hidden, max_block_n, dtype, affine):
    torch.manual_seed(rows * hidden)
    # A large common offset: the variance must come from deviations, not from sum(x**2) - n * mean**2.
    x = (torch.randn(rows, hidden, device=DEVICE) * 2 + 50).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype) if affine != "none" else None
    bias = torch.randn(hidden, device=DEVICE).to(dtype) if affine == "weight_bias" else None
    y_ref, mean_ref, rstd_ref = layer_norm_reference(x, weight, bias, 1e-5)
    dy = torch.randn_like(y_ref)
    dx_ref, dw_ref, db_ref = layer_norm_backward_reference(dy, x, weight, mean_ref, rstd_ref, True, True)

    y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, 1e-5, max_block_n=max_block_n)
    dx, dw, db = kernels.layer_norm_backward(dy, x, weight, mean, rstd, True, bias is not None,
                                             max_block_n=max_block_n)

    assert y.dtype == x.dtype and dx.dtype == x.dtype
    # The offset of 50 puts the mean's fp32 rounding (a few ulps of 50, ~1e-5) into every centered value,
    # in whichever order the sum is taken: fp32 outputs get that much absolute slack.
    fp32_slack = 1e-4 if dtype == torch.float32 else None
    assert_close(y, y_ref, atol=fp32_slack)
    assert_close(mean, mean_ref, dtype=dtype)
    assert_close(rstd, rstd_ref, dtype=dtype)
    assert_close(dx, dx_ref, atol=fp32_slack)
    if weight is not None:
        assert dw.dtype == weight.dtype
        assert_relative_error(dw, dw_ref, 1e-5 if dtype == torch.float32 else 1e-2)
    else:
        assert dw is None
    if bias is not None:
        assert db.dtype == torch.float32
        assert_relative_error(db, db_ref, 1e-5)
    else:
        assert db is None


@pytest.mark.parametrize("max_block_n", [kernels.MAX_BLOCK_N, 128])
def test_forward_matches_torch_with_fp32_affine_on_bf16_input(max_block_n):
    torch.manual_seed(1)
    x = torch.randn(9, 300, device=DEVICE).to(torch.bfloat16)
    weight, bias = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    y, _, _ = kernels.layer_norm_forward(x, weight, bias, 1e-5, max_block_n=max_block_n)
    assert y.dtype == torch.bfloat16
    # torch computes a bf16 layer_norm in fp32 and rounds once (its CUDA kernel refuses fp32 weights on bf16)
    assert_close(y, F.layer_norm(x.float(), (300,), weight, bias, 1e-5).to(torch.bfloat16))


def test_strided_rows_are_read_with_their_stride():
    torch.manual_seed(2)
    x = torch.randn(6, 200, device=DEVICE)[:, :130]  # rows 200 apart in memory, unit stride along hidden
    weight, bias = torch.randn(130, device=DEVICE), torch.randn(130, device=DEVICE)
    y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, 1e-5)
    y_ref, mean_ref, rstd_ref = layer_norm_reference(x, weight, bias, 1e-5)
    assert_close(y, y_ref)
    assert_close(mean, mean_ref)
    assert_close(rstd, rstd_ref)


@pytest.mark.parametrize("rows,hidden,max_block_n", SHAPES)
@pytest.mark.parametrize("centered", [True, False], ids=["layer_norm", "rms_norm"])
def test_residual_add_is_normalised_and_returned(rows, hidden, max_block_n, centered):
    """h = x + residual (rounded to x's dtype) written once and normalised; backward adds h's own gradient."""
    torch.manual_seed(hidden)
    x, residual = (torch.randn(rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    weight, bias = torch.randn(hidden, device=DEVICE), (torch.randn(hidden, device=DEVICE) if centered else None)
    y, h, mean, rstd = kernels.add_norm_forward(x, residual, weight, bias, 1e-5, centered=centered,
                                                max_block_n=max_block_n)
    h_ref = x + residual
    assert_close(h, h_ref)
    if centered:
        y_ref, _, _ = layer_norm_reference(h_ref, weight, bias, 1e-5)
        assert_close(mean, layer_norm_reference(h, weight, bias, 1e-5)[1], dtype=torch.float32)
    else:
        y_ref = rms_norm_reference(h_ref, weight, 1e-5, casting_mode="gemma")[0]
        assert mean is None
    assert_close(y, y_ref)

    dy, dh = torch.randn_like(y), torch.randn_like(h)
    if centered:
        dx, _, _ = kernels.layer_norm_backward(dy, h, weight, mean, rstd, False, False, dh=dh, max_block_n=max_block_n)
        dx_ref, _, _ = layer_norm_backward_reference(dy, h, weight, mean, rstd, False, False)
    else:
        dx, _ = kernels.rms_norm_backward(dy, h, weight, rstd, 0.0, "gemma", False, dh=dh, max_block_n=max_block_n)
        dx_ref, _ = rms_norm_backward_reference(dy, h, weight, rstd, 0.0, "gemma", False)
    assert_close(dx, (dx_ref.float() + dh.float()).to(dx.dtype))
