"""In-place scaling by a device scalar (the loss's cotangent applied to gradients computed in forward)."""

import pytest
import torch

from liger_compile.kernels._launch import can_launch
from liger_compile.kernels.scale import BLOCK, scale_
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("n_elements", [1, 1000, 2 * BLOCK + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("factor", [0.37, -3.0, 0.0, float("inf"), 1.0])
def test_scale_is_the_fp32_product_rounded_once(n_elements, dtype, factor):
    torch.manual_seed(n_elements)
    tensor = torch.randn(n_elements, device=DEVICE).to(dtype)
    # of another dtype, as a loss's cotangent can be
    factor_tensor = torch.tensor(factor, device=DEVICE, dtype=torch.bfloat16 if dtype == torch.float32 else
                                 torch.float32)
    expected = (tensor.float() * factor_tensor.float()).to(dtype)
    assert scale_(tensor, factor_tensor) is tensor
    # Exact on a GPU; Triton's interpreter rounds fp32 to bf16 towards zero, one bf16 ulp from the GPU's rounding.
    exact = dtype == torch.float32 or DEVICE == "cuda"
    torch.testing.assert_close(tensor, expected, rtol=0 if exact else 2**-7, atol=0, equal_nan=True)


def test_factor_one_leaves_every_bit_as_it_was():
    """The early exit for a cotangent of 1 keeps NaN payloads, negative zeros and subnormals untouched."""
    bits = torch.tensor([0x7FC00001, 0x80000000 - 2**32, 0x00000001, 0xFF800000 - 2**32, 0x3F800000],
                        dtype=torch.int32)
    tensor = bits.view(torch.float32).to(DEVICE).clone()
    scale_(tensor, torch.ones((), device=DEVICE))
    assert torch.equal(tensor.view(torch.int32).cpu(), bits)


def test_factor_other_than_one_is_applied_to_every_block():
    tensor = torch.ones(3 * BLOCK + 1, device=DEVICE)
    scale_(tensor, torch.tensor(2.0, device=DEVICE))
    assert torch.equal(tensor, torch.full_like(tensor, 2.0))
