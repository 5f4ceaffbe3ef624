"""The weight gradient's accumulation over row chunks, out += a.T @ b, against the fp32 product rounded once."""

import pytest
import torch

from liger_compile.kernels._launch import can_launch
from liger_compile.kernels.linear_gradient import TILES, accumulate_transposed_product_
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("shape", [(37, 300, 70), (TILES.block_k, TILES.block_m, TILES.block_n), (1, 33, 5)],
                         ids=["ragged", "one-tile", "one-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_accumulates_the_fp32_product(shape, dtype):
    n_k, n_rows, n_cols = shape
    torch.manual_seed(n_k)
    a = torch.randn(n_k, n_rows, device=DEVICE).to(dtype)
    b = torch.randn(n_k, n_cols, device=DEVICE).to(dtype)
    out = torch.randn(n_rows, n_cols, device=DEVICE).to(dtype)
    expected = (out.float() + a.float().t() @ b.float()).to(dtype)
    assert accumulate_transposed_product_(out, a, b) is out
    # 16 bits: one ulp, the interpreter rounding towards zero; fp32 is multiplied in fp32, not tf32.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * n_k**0.5)


def test_any_strides():
    """A chunk of transposed hidden states and a gradient laid out column-major are read and written in place."""
    torch.manual_seed(0)
    a = torch.randn(24, 50, device=DEVICE)
    b = torch.randn(40, 24, device=DEVICE).t()  # (24, 40), column stride 24
    out = torch.randn(40, 50, device=DEVICE).t()  # (50, 40), row stride 1
    expected = out + a.t() @ b
    accumulate_transposed_product_(out, a, b)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_output_is_left_alone():
    out = torch.empty(0, 8, device=DEVICE)
    assert accumulate_transposed_product_(out, torch.empty(3, 0, device=DEVICE), torch.ones(3, 8, device=DEVICE)) is out
