"""Divergence Triton kernels against the PyTorch reference (interpreted on CPU, natively on GPU): every form,
vocabularies inside one block and across blocks, ignored rows, extreme log-probabilities."""

import pytest
import torch

from liger_compile.kernels import divergence as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.divergence import reference_derivatives, reference_elements
from tests.conftest import DEVICE
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

SHAPES = [(5, 1000), (3, 4099)]
if DEVICE == "cuda":
    SHAPES += [(64, 128256)]
FORMS = [("kl_log_target", 0.0), ("kl_prob_target", 0.0), ("mixture", 0.5), ("mixture", 0.3)]


def log_probabilities(shape, scale=1.0, seed=0):
    torch.manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, device=DEVICE) * scale, -1)


def sides(shape, form, scale=1.0):
    x, y = log_probabilities(shape, scale, 0), log_probabilities(shape, scale, 1)
    return x, (y.exp() if form == "kl_prob_target" else y)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form, beta", FORMS, ids=[f"{f}-{b}" for f, b in FORMS])
def test_row_losses_elements_and_gradients(shape, form, beta):
    x, y = sides(shape, form)
    labels = torch.arange(shape[0], device=DEVICE)
    labels[1] = -100
    rows = torch.empty(shape[0], device=DEVICE)
    kernels.divergence_rows(x, y, form=form, beta=beta, labels=labels, ignore_index=-100, row_loss=rows)
    expected_elements = reference_elements(x, y, form, beta)
    expected_rows = expected_elements.sum(-1)
    expected_rows[1] = 0
    assert_close(rows, expected_rows, rtol=1e-5, atol=1e-5)

    elements = torch.empty_like(x)
    kernels.divergence_rows(x, y, form=form, beta=beta, elements=elements)
    assert_close(elements, expected_elements)

    scale = torch.rand(shape[0], device=DEVICE)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    kernels.divergence_rows(x, y, form=form, beta=beta, labels=labels, ignore_index=-100, scale=scale, dx=dx, dy=dy)
    expected_dx, expected_dy = (d * scale[:, None] for d in reference_derivatives(x, y, form, beta))
    expected_dx[1] = expected_dy[1] = 0
    assert_close(dx, expected_dx)
    assert_close(dy, expected_dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_are_read_in_fp32_and_gradients_rounded_once(dtype):
    x, y = (t.to(dtype) for t in sides((4, 3000), "mixture"))
    cotangent = torch.randn(x.shape, device=DEVICE).to(dtype)
    dx = torch.empty_like(x)
    kernels.divergence_rows(x, y, form="mixture", beta=0.5, cotangent=cotangent, dx=dx)
    expected = reference_derivatives(x.float(), y.float(), "mixture", 0.5)[0] * cotangent.float()
    assert_close(dx, expected.to(dtype))


def test_extreme_log_probabilities_stay_finite():
    """Near-one-hot rows: log-probabilities down to about -1e4, whose exp underflows to 0."""
    x, y = log_probabilities((3, 2000), scale=3000.0, seed=0), log_probabilities((3, 2000), scale=3000.0, seed=1)
    rows, dx, dy = torch.empty(3, device=DEVICE), torch.empty_like(x), torch.empty_like(y)
    kernels.divergence_rows(x, y, form="mixture", beta=0.5, row_loss=rows)
    kernels.divergence_rows(x, y, form="mixture", beta=0.5, scale=torch.ones(3, device=DEVICE), dx=dx, dy=dy)
    assert torch.isfinite(rows).all() and torch.isfinite(dx).all() and torch.isfinite(dy).all()
    assert_close(rows, reference_elements(x, y, "mixture", 0.5).sum(-1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("beta, student_is_x", [(0.0, True), (0.5, True), (1.0, False)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_from_logits_writes_the_student_logits_gradient(shape, beta, student_is_x, temperature):
    torch.manual_seed(2)
    student = (torch.randn(shape, device=DEVICE) * 4).requires_grad_()
    teacher = torch.randn(shape, device=DEVICE) * 4
    labels = torch.arange(shape[0], device=DEVICE)
    labels[0] = -100
    form = "kl_log_target" if beta in (0.0, 1.0) else "mixture"
    s, t = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    expected_rows = reference_elements(*((s, t) if student_is_x else (t, s)), form, beta).sum(-1)
    expected_rows = torch.where(labels == -100, 0.0, expected_rows)
    scale = torch.rand(shape[0], device=DEVICE)
    expected_grad, = torch.autograd.grad((expected_rows * scale).sum(), student)

    rows, grad = torch.empty(shape[0], device=DEVICE), student.detach().clone()
    kernels.distillation_rows(grad, teacher, form=form, student_is_x=student_is_x, beta=beta,
                              temperature=temperature, labels=labels, ignore_index=-100, row_loss=rows, scale=scale)
    assert_close(rows, expected_rows.detach(), rtol=1e-5, atol=1e-5)
    assert_close(grad, expected_grad)
