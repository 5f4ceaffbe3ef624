"""torch.ops.liger.embedding: opcheck, forward and backward against F.embedding's autograd, errors, compile."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error

DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(ids_shape, n_embeddings, dim, dtype, seed=0, ids_dtype=torch.int64):
    torch.manual_seed(seed)
    weight = torch.randn(n_embeddings, dim, device=DEVICE).to(dtype).requires_grad_()
    ids = torch.randint(0, n_embeddings, ids_shape, device=DEVICE, dtype=ids_dtype)
    ids.view(-1)[::4] = 1  # a repeated id, and the padding row of the tests below
    return ids, weight


def eager_result(ids, weight, padding_idx, dy):
    reference = weight.detach().clone().requires_grad_()
    y = F.embedding(ids, reference, padding_idx)
    y.backward(dy)
    return y, reference.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding_idx", [None, 1, -3])
@pytest.mark.parametrize("ids_shape", [(7,), (2, 9), (2, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_eager(op_path, dtype, padding_idx, ids_shape):
    ids, weight = make_inputs(ids_shape, 13, 40, dtype)
    y = torch.ops.liger.embedding(ids, weight, padding_idx)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dw_ref = eager_result(ids, weight, padding_idx, dy)
    assert y.shape == (*ids_shape, 40) and y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y, y_ref)
    if dtype == torch.float32:
        assert_close(weight.grad, dw_ref)
    else:  # eager's CPU kernel sums in bf16, one rounding per add; the op sums in fp32 and rounds once
        assert_relative_error(weight.grad, dw_ref, 1e-2)
    if padding_idx is not None:
        assert not weight.grad[padding_idx].any()


def test_int32_ids_and_a_frozen_weight(op_path):
    ids, weight = make_inputs((3, 4), 10, 16, torch.float32, ids_dtype=torch.int32)
    frozen = weight.detach()
    y = liger_compile.ops.embedding(ids, frozen)
    assert torch.equal(y, F.embedding(ids, frozen)) and y.grad_fn is None


def test_non_contiguous_weight_and_gradient(op_path):
    ids, weight = make_inputs((6,), 12, 64, torch.float32)
    strided = weight.detach()[:, ::2].clone().t().contiguous().t().requires_grad_()  # column stride != 1
    y = liger_compile.ops.embedding(ids, strided)
    dy = torch.randn(32, 6, device=DEVICE).t()  # non-contiguous incoming gradient
    y.backward(dy)
    y_ref, dw_ref = eager_result(ids, strided, None, dy)
    assert torch.equal(y, y_ref)
    assert_close(strided.grad, dw_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_opcheck(op_path, dtype):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("on CPU eager runs the interpreted kernel and traced graphs the reference, which round "
                    "differently (the interpreter truncates to bf16); the GPU suite runs opcheck through the kernels")
    ids, weight = make_inputs((2, 7), 11, 24, dtype)
    opcheck(torch.ops.liger.embedding.default, (ids, weight, None))
    opcheck(torch.ops.liger.embedding.default, (ids, weight, 3))
    dy = torch.randn(2, 7, 24, device=DEVICE).to(dtype)
    opcheck(torch.ops.liger.embedding_backward.default, (dy, ids, 11, None))


def test_compiles_once_for_every_length(op_path):
    ids, weight = make_inputs((2, 8), 30, 16, torch.float32)
    compiled = torch.compile(liger_compile.ops.embedding, dynamic=True, fullgraph=True)
    for length in (8, 5, 11):
        ids = torch.randint(0, 30, (2, length), device=DEVICE)
        assert torch.equal(compiled(ids, weight), F.embedding(ids, weight))


@pytest.mark.parametrize("make,message", [
    (lambda w: (torch.zeros(3, device=DEVICE), w, None), "ids must be int32 or int64"),
    (lambda w: (torch.zeros(3, dtype=torch.long, device=DEVICE), w.detach().double(), None),
     "weight must be float32, float16 or bfloat16"),
    (lambda w: (torch.zeros(3, dtype=torch.long, device=DEVICE), w.detach()[0], None), "weight must be 2-D"),
    (lambda w: (torch.zeros(3, dtype=torch.long, device=DEVICE), w, 10), "padding_idx must be within \\[-10, 10\\)"),
    (lambda w: (torch.zeros(3, dtype=torch.long, device="meta"), w, None), "all tensors must be on one device"),
])
def test_bad_input_is_refused_with_the_op_named(make, message):
    _, weight = make_inputs((3,), 10, 8, torch.float32)
    with pytest.raises(LigerOpError, match=f"liger::embedding: {message}"):
        torch.ops.liger.embedding(*make(weight))


def test_backward_op_checks_its_shapes():
    with pytest.raises(LigerOpError, match="liger::embedding_backward: dy \\(3, 8\\) must be ids' shape \\(4,\\)"):
        torch.ops.liger.embedding_backward(torch.randn(3, 8, device=DEVICE), torch.zeros(4, dtype=torch.long,
                                           device=DEVICE), 10, None)
