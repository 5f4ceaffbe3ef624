"""torch.ops.liger.fused_linear_cross_entropy against the unfused eager computation: chunk boundaries, bias,
tied weights, every reduction, forward-only mode, opcheck, and the nn modules."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError, fused_linear_cross_entropy
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error
from tests.ops.test_cross_entropy import eager_loss

ROWS, HIDDEN, VOCAB = 37, 16, 300


def make_inputs(dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE) / HIDDEN**0.5).to(dtype).requires_grad_()
    b = torch.randn(VOCAB, device=DEVICE).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, VOCAB, (ROWS,), device=DEVICE)
    target[::5] = -100
    return hidden, weight, b, target


def check(dtype, bias=False, chunk_rows=8, **options):
    hidden, weight, b, target = make_inputs(dtype, bias)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    loss = fused_linear_cross_entropy(hidden, weight, target, b, chunk_rows=chunk_rows, **options)
    references = [t.detach().clone().requires_grad_() for t in inputs]
    expected = eager_loss(F.linear(*references), target, **options)
    cotangent = torch.rand_like(expected)
    grads = torch.autograd.grad(loss, inputs, cotangent)
    expected_grads = torch.autograd.grad(expected, references, cotangent)
    assert_close(loss, expected, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-4)
    # bf16: the weight gradient is summed over chunks in bf16, and eager rounds dlogits where we do too:
    # compare each gradient as a whole.
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative_error(grad, expected_grad, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_unfused_eager(op_path, reduction, bias, dtype):
    check(dtype, bias, reduction=reduction)


@pytest.mark.parametrize("chunk_rows", [1, 8, 36, 37, 0], ids=["1", "8", "36", "37=N", "auto"])
def test_chunk_boundaries_that_do_not_divide_the_rows(op_path, chunk_rows):
    check(torch.float32, chunk_rows=chunk_rows)


def test_every_option_at_once(op_path):
    check(torch.float32, bias=True, label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0, ignore_index=-100)


def test_tied_embedding_gets_both_gradients(op_path):
    torch.manual_seed(3)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN).to(DEVICE)
    ids = torch.randint(0, VOCAB, (ROWS,), device=DEVICE)
    target = torch.roll(ids, -1)
    fused_linear_cross_entropy(torch.tanh(embedding(ids)), embedding.weight, target, chunk_rows=10).backward()
    grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    F.cross_entropy(F.linear(torch.tanh(embedding(ids)), embedding.weight), target).backward()
    assert_relative_error(grad, embedding.weight.grad, 1e-5)


def test_forward_only_without_grad(op_path):
    hidden, weight, _, target = make_inputs(torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target)
        _, _, grad_hidden, grad_weight, _ = torch.ops.liger.fused_linear_cross_entropy_forward(
            hidden, weight, None, target, None, -100, "mean", 0.0, 0.0, None, 0, False, False, False)
    assert grad_hidden.numel() == 0 and grad_weight.numel() == 0  # nothing computed for backward
    assert_close(loss, F.cross_entropy(F.linear(hidden, weight), target).detach())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(op_path, reduction):
    hidden, weight, b, target = make_inputs(torch.float32, bias=True)
    opcheck(torch.ops.liger.fused_linear_cross_entropy_forward.default,
            (hidden, weight, b, target, None, -100, reduction, 0.0, 0.0, None, 8, True, True, True))


def test_bad_input_gets_a_clear_error():
    hidden, weight, _, target = make_inputs(torch.float32)
    with pytest.raises(LigerOpError, match="fused_linear_cross_entropy: .*one dtype"):
        fused_linear_cross_entropy(hidden, weight.half(), target)
    with pytest.raises(LigerOpError, match=r"fused_linear_cross_entropy: hidden must be \(N, H\)"):
        fused_linear_cross_entropy(hidden, weight[:, :5], target)
    with pytest.raises(LigerOpError, match="labels must be in"):
        fused_linear_cross_entropy(hidden, weight, target + VOCAB)


def test_nn_modules_match_their_torch_counterparts(op_path):
    hidden, weight, b, target = make_inputs(torch.float32, bias=True)
    logits = F.linear(hidden, weight, b)
    expected = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target)
    assert_close(liger_compile.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target), expected)
    fused = liger_compile.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_rows=16)
    assert_close(fused(hidden.view(1, ROWS, HIDDEN), weight, target.view(1, ROWS), b), expected)


def test_a_second_backward_through_one_loss_is_refused(op_path):
    hidden, weight, _, target = make_inputs(torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(LigerOpError, match="backward ran twice"):
        loss.backward()
