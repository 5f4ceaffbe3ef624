"""torch.ops.liger.fused_linear_jsd against the unfused eager computation (two lm_heads, log_softmax at a
temperature, the generalized JSD): chunk boundaries, beta, temperatures, ignored rows, bf16, forward-only mode,
opcheck, a teacher that needs a gradient, and the nn module."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError, fused_linear_jsd
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error
from tests.ops.test_divergence import eager_jsd

ROWS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 37, 16, 24, 300


def make_inputs(dtype, seed=0):
    torch.manual_seed(seed)
    student_hidden = torch.randn(ROWS, STUDENT_HIDDEN, device=DEVICE).to(dtype).requires_grad_()
    student_weight = (torch.randn(VOCAB, STUDENT_HIDDEN, device=DEVICE) / 2).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(ROWS, TEACHER_HIDDEN, device=DEVICE).to(dtype)
    teacher_weight = (torch.randn(VOCAB, TEACHER_HIDDEN, device=DEVICE) / 2).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS,), device=DEVICE)
    labels[::4] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def eager(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature=1.0, **options):
    student = torch.log_softmax(F.linear(student_hidden, student_weight).float() / temperature, -1)
    teacher = torch.log_softmax(F.linear(teacher_hidden, teacher_weight).float() / temperature, -1)
    return eager_jsd(student, teacher, labels, **options)


def check(dtype=torch.float32, chunk_rows=8, **options):
    inputs = make_inputs(dtype)
    loss = fused_linear_jsd(*inputs, chunk_rows=chunk_rows, **options)
    expected = eager(*inputs, **options)
    grads = torch.autograd.grad(loss * 3, inputs[:2])
    expected_grads = torch.autograd.grad(expected * 3, inputs[:2])
    assert_close(loss, expected, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative_error(grad, expected_grad, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_unfused_eager(op_path, beta, temperature, dtype):
    check(dtype, beta=beta, temperature=temperature)


@pytest.mark.parametrize("chunk_rows", [1, 36, 37, 0], ids=["1", "36", "37=N", "auto"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_chunks_and_reductions(op_path, chunk_rows, reduction):
    check(chunk_rows=chunk_rows, reduction=reduction)


def test_forward_only_without_grad(op_path):
    inputs = make_inputs(torch.float32)
    with torch.no_grad():
        loss = fused_linear_jsd(*inputs)
        _, grad_hidden, grad_weight = torch.ops.liger.fused_linear_jsd_forward(
            *inputs, 0.5, -100, 1.0, "batchmean", 0, False, False)
    assert grad_hidden.numel() == 0 and grad_weight.numel() == 0
    assert_close(loss, eager(*inputs).detach())


def test_opcheck(op_path):
    inputs = make_inputs(torch.float32)
    opcheck(torch.ops.liger.fused_linear_jsd_forward.default,
            (*inputs, 0.3, -100, 2.0, "batchmean", 8, True, True))


def test_a_teacher_that_needs_a_gradient_is_refused_in_backward(op_path):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs(torch.float32)
    loss = fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight.requires_grad_(), labels)
    with pytest.raises(LigerOpError, match="fused_linear_jsd: the teacher gets no gradient"):
        loss.backward()


def test_bad_input_gets_a_clear_error():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs(torch.float32)
    with pytest.raises(LigerOpError, match="fused_linear_jsd: student and teacher must have the same rows"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight[:10], labels)
    with pytest.raises(LigerOpError, match="fused_linear_jsd: temperature must be > 0"):
        fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature=0.0)
    with pytest.raises(LigerOpError, match="fused_linear_jsd: student_hidden .* and student_weight .* one dtype"):
        fused_linear_jsd(student_hidden, student_weight.double().float().half(), teacher_hidden, teacher_weight)


def test_nn_module_matches_eager(op_path):
    inputs = make_inputs(torch.float32)
    module = liger_compile.nn.FusedLinearJSD(beta=0.3, temperature=2.0, chunk_rows=16)
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = inputs
    loss = module(student_hidden.view(1, ROWS, -1), student_weight, teacher_hidden.view(1, ROWS, -1),
                  teacher_weight, labels.view(1, ROWS))
    assert_close(loss, eager(*inputs, beta=0.3, temperature=2.0))
