"""RoPE Triton kernel against the PyTorch reference (interpreted on CPU, natively on GPU)."""

import pytest
import torch

from liger_compile.kernels import rope as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.rope import rope_reference, transposed_sin
from tests.conftest import DEVICE
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# (batch, q heads, k heads, seq, head_dim, rotary_dim): GQA, odd head dims, partial rotary, row counts that leave a
# partial last tile, tiles that span several positions
CASES = [(2, 4, 2, 5, 16, 16), (1, 3, 1, 7, 48, 48), (2, 2, 2, 3, 80, 40), (1, 5, 5, 2, 96, 32)]
if DEVICE == "cuda":
    CASES += [(2, 32, 8, 257, 128, 128), (1, 80, 8, 33, 64, 64)]


def rotate_pair(q, k, cos, sin, backward):
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    kernels.rope(q, k, cos, sin, q_out, k_out, backward=backward)
    return q_out, k_out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["BHTD", "BTHD"])
def test_forward_and_backward_rotations_match_reference(case, dtype, heads_first):
    batch, heads_q, heads_k, seq, head_dim, rotary_dim = case
    torch.manual_seed(sum(case))

    def heads(n):  # (B, H, T, D) as a transposed (B, T, H, D) projection, as HF attention makes it, or BTHD
        x = torch.randn(batch, seq, n, head_dim, device=DEVICE).to(dtype)
        return x.transpose(1, 2) if heads_first else x

    q, k = heads(heads_q), heads(heads_k)
    cos_shape = (batch, 1, seq, rotary_dim) if heads_first else (batch, seq, 1, rotary_dim)
    cos, sin = (torch.randn(cos_shape, device=DEVICE).to(dtype) for _ in range(2))  # any values, per batch row
    for backward in (False, True):
        q_out, k_out = rotate_pair(q, k, cos, sin, backward)
        reference_sin = transposed_sin(sin) if backward else sin
        # fp32 vs fp32 eager; bf16: the products round as in eager, up to the interpreter's truncation
        assert_close(q_out, rope_reference(q, cos, reference_sin))
        assert_close(k_out, rope_reference(k, cos, reference_sin))


def test_cos_varying_along_every_dim_is_read_per_row():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 16, device=DEVICE)
    cos, sin = torch.randn(2, 3, 4, 16, device=DEVICE), torch.randn(2, 3, 4, 16, device=DEVICE)
    q_out = torch.empty_like(q)
    kernels.rope(q, None, cos, sin, q_out, None, backward=False)
    assert_close(q_out, rope_reference(q, cos, sin))


def test_batch_shared_cos_and_empty_input():
    torch.manual_seed(1)
    q = torch.randn(3, 2, 6, 32, device=DEVICE)
    cos, sin = torch.randn(1, 1, 6, 32, device=DEVICE), torch.randn(1, 1, 6, 32, device=DEVICE)
    q_out = torch.empty_like(q)
    kernels.rope(q, None, cos, sin, q_out, None, backward=False)
    assert_close(q_out, rope_reference(q, cos, sin))
    empty = torch.empty(0, 2, 6, 32, device=DEVICE)
    kernels.rope(empty, None, cos, sin, torch.empty_like(empty), None, backward=False)  # no launch, no error
