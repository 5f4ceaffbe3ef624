"""RMSNorm Triton kernels against the PyTorch reference (under TRITON_INTERPRET=1 on CPU, natively on GPU)."""

import pytest
import torch

from liger_compile.kernels import norm as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.rms_norm import output_dtype, rms_norm_backward_reference, rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# (rows, hidden, max_block_n): odd sizes, several rows per program, and the looped path for wide rows
# (forced with a small block so the interpreter stays quick; hidden 5000 loops over 4096-wide blocks).
SHAPES = [
    (3, 37, kernels.MAX_BLOCK_N),
    (10, 1000, kernels.MAX_BLOCK_N),
    (7, 1000, 256),
    (2, 5000, 4096),
]
if DEVICE == "cuda":
    SHAPES += [(4099, 4096, kernels.MAX_BLOCK_N), (1021, 128, kernels.MAX_BLOCK_N), (37, 16384, kernels.MAX_BLOCK_N)]


def run_kernels(x, weight, eps, offset, mode, dy, max_block_n):
    out_dtype = output_dtype(x.dtype, None if weight is None else weight.dtype, mode)
    y, rstd = kernels.rms_norm_forward(x, weight, eps, offset, mode, out_dtype, max_block_n=max_block_n)
    dx, dw = kernels.rms_norm_backward(dy, x, weight, rstd, offset, mode, compute_dw=True,
                                       max_block_n=max_block_n)
    return y, rstd, dx, dw


@pytest.mark.parametrize("rows,hidden,max_block_n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", kernels.CASTING_MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
def test_kernels_match_reference(rows, hidden, max_block_n, dtype, mode, affine):
    torch.manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, device=DEVICE) * 2 + 0.5).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype) if affine else None
    offset = 0.5 if affine else 0.0
    y_ref, rstd_ref = rms_norm_reference(x, weight, 1e-6, offset, mode)
    dy = torch.randn_like(y_ref)
    dx_ref, dw_ref = rms_norm_backward_reference(dy, x, weight, rstd_ref, offset, mode, compute_dw=True)

    y, rstd, dx, dw = run_kernels(x, weight, 1e-6, offset, mode, dy, max_block_n)

    assert y.dtype == y_ref.dtype and dx.dtype == x.dtype
    assert_close(y, y_ref)
    assert_close(rstd, rstd_ref, dtype=dtype)
    assert_close(dx, dx_ref)
    if affine:
        assert dw.dtype == weight.dtype
        assert_relative_error(dw, dw_ref, 1e-5 if dtype == torch.float32 else 1e-2)
    else:
        assert dw is None


@pytest.mark.parametrize("max_block_n", [kernels.MAX_BLOCK_N, 128])
def test_llama_mode_with_fp32_weight_outputs_fp32(max_block_n):
    torch.manual_seed(1)
    x = torch.randn(9, 300, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(300, device=DEVICE)
    y_ref, rstd_ref = rms_norm_reference(x, weight, 1e-5, 0.0, "llama")
    dy = torch.randn_like(y_ref)
    dx_ref, dw_ref = rms_norm_backward_reference(dy, x, weight, rstd_ref, 0.0, "llama", compute_dw=True)

    y, _, dx, dw = run_kernels(x, weight, 1e-5, 0.0, "llama", dy, max_block_n)

    assert y.dtype == torch.float32 and dw.dtype == torch.float32
    assert_close(y, y_ref, dtype=torch.bfloat16)
    assert_close(dx, dx_ref)
    assert_relative_error(dw, dw_ref, 1e-2)


def test_backward_without_weight_gradient_skips_it():
    x = torch.randn(5, 64, device=DEVICE)
    weight = torch.randn(64, device=DEVICE)
    _, rstd = rms_norm_reference(x, weight, 1e-6)
    dy = torch.randn_like(x)
    dx, dw = kernels.rms_norm_backward(dy, x, weight, rstd, 0.0, "llama", compute_dw=False)
    dx_ref, _ = rms_norm_backward_reference(dy, x, weight, rstd, 0.0, "llama", compute_dw=False)
    assert dw is None
    assert_close(dx, dx_ref)


def test_strided_rows_are_read_with_their_stride():
    torch.manual_seed(2)
    wide = torch.randn(6, 200, device=DEVICE)
    x = wide[:, :130]  # rows 200 apart in memory, unit stride along hidden
    weight = torch.randn(130, device=DEVICE)
    y, rstd = kernels.rms_norm_forward(x, weight, 1e-6, 0.0, "llama", torch.float32)
    y_ref, rstd_ref = rms_norm_reference(x, weight, 1e-6)
    assert_close(y, y_ref)
    assert_close(rstd, rstd_ref)
