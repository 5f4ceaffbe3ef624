"""Embedding Triton kernels against PyTorch (interpreted on CPU, natively on GPU)."""

import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import embedding as kernels
from liger_compile.kernels._launch import can_launch
from tests.conftest import DEVICE
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# (ids, vocabulary, dim): one id; odd widths; rows wider than one column block; more ids than rows of weight.
SHAPES = [(1, 5, 3), (37, 11, 100), (64, 300, 1500)]
if DEVICE == "cuda":
    SHAPES += [(16384, 128256, 4096), (4099, 1000, 4097)]


def expected_weight_gradient(dy, ids, n_embeddings, padding_idx):
    """The sum of each id's gradient rows in float64, rounded once to dy's dtype (what eager's CUDA kernel
    computes, up to the order of its fp32 sums)."""
    dw = torch.zeros(n_embeddings, dy.shape[1], dtype=torch.float64, device=dy.device)
    dw.index_add_(0, ids, dy.double())
    if padding_idx >= 0:
        dw[padding_idx] = 0
    return dw.to(dy.dtype)


@pytest.mark.parametrize("n_ids,n_embeddings,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding_idx", [-1, 2])
def test_kernels_match_reference(n_ids, n_embeddings, dim, dtype, padding_idx):
    torch.manual_seed(n_ids + dim)
    weight = torch.randn(n_embeddings, dim, device=DEVICE).to(dtype)
    # a frequent id (longer segments than one summing step) among uniform ones
    ids = torch.randint(0, n_embeddings, (n_ids,), device=DEVICE)
    ids[::3] = min(2, n_embeddings - 1)
    out = torch.empty(n_ids, dim, dtype=dtype, device=DEVICE)
    kernels.embedding_forward(ids, weight, out)
    assert torch.equal(out, F.embedding(ids, weight))

    dy = torch.randn(n_ids, dim, device=DEVICE).to(dtype)
    dw = torch.zeros_like(weight)
    kernels.embedding_backward(dy, ids, dw, padding_idx)
    # fp32 sums of n unit-sized terms carry rounding errors growing like sqrt(n) (the frequent id's segment)
    longest = torch.bincount(ids).max().item()
    assert_close(dw, expected_weight_gradient(dy, ids, n_embeddings, padding_idx),
                 atol=1e-5 * longest ** 0.5 if dtype == torch.float32 else None)


def test_backward_is_bit_identical_run_to_run():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (200,), device=DEVICE)
    dy = torch.randn(200, 33, device=DEVICE)
    results = []
    for _ in range(2):
        dw = torch.zeros(7, 33, device=DEVICE)
        kernels.embedding_backward(dy, ids, dw, -1)
        results.append(dw)
    assert torch.equal(*results)


def test_int32_ids_and_strided_rows():
    torch.manual_seed(1)
    weight = torch.randn(20, 2 * 48, device=DEVICE)[:, :48]  # row stride 96
    ids = torch.randint(0, 20, (9,), device=DEVICE, dtype=torch.int32)
    out = torch.empty(9, 48, device=DEVICE)
    kernels.embedding_forward(ids, weight, out)
    assert torch.equal(out, weight[ids.long()])


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the device assertion stops the kernel, and the context")
def test_out_of_range_ids_read_nothing():
    weight = torch.randn(4, 8, device=DEVICE)
    out = torch.zeros(3, 8, device=DEVICE)
    kernels.embedding_forward(torch.tensor([1, 4, -1], device=DEVICE), weight, out)
    assert torch.equal(out[0], weight[1])
    assert out[1:].isnan().all()


def test_empty_ids():
    out = torch.empty(0, 8, device=DEVICE)
    kernels.embedding_forward(torch.empty(0, dtype=torch.long, device=DEVICE), torch.randn(4, 8, device=DEVICE), out)
    dw = torch.zeros(4, 8, device=DEVICE)
    kernels.embedding_backward(out, torch.empty(0, dtype=torch.long, device=DEVICE), dw, -1)
    assert not dw.any()
