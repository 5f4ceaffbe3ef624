"""torch.ops.liger.kl_div and torch.ops.liger.jsd against eager PyTorch (F.kl_div, and the generalized JSD as a
distillation trainer writes it): every reduction, both target forms, beta 0 / 0.3 / 0.5 / 1, ignored rows,
leading dims, bf16, gradients for both inputs, opcheck, errors, and the nn modules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError, jsd, kl_div
from tests.conftest import DEVICE
from tests.helpers import assert_close

SHAPES = [(7, 300), (2, 3, 1000)]


def log_probabilities(shape, dtype=torch.float32, seed=0, scale=1.0):
    torch.manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, device=DEVICE) * scale, -1).to(dtype).requires_grad_()


def eager_jsd(student, teacher, labels=None, beta=0.5, ignore_index=-100, reduction="batchmean"):
    """The generalized JSD as TRL's GKD trainer computes it (in fp32, or float64 for float64 inputs)."""
    student, teacher = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (student, teacher))
    if beta == 0:
        elements = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        elements = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
        elements = (beta * F.kl_div(mixture, teacher, reduction="none", log_target=True)
                    + (1 - beta) * F.kl_div(mixture, student, reduction="none", log_target=True))
    rows = elements.sum(-1).reshape(-1)
    counted = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    total = rows[counted].sum()
    return {"sum": total, "batchmean": total / counted.sum(),
            "mean": total / (counted.sum() * student.shape[-1])}[reduction]


def compare(loss, expected, inputs, dtype):
    cotangent = torch.rand_like(expected)
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, cotangent.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, wanted, cotangent)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    assert_close(loss.float(), expected.float(), **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert_close(grad.float(), expected_grad.float(), **tolerance)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [True, False], ids=["log_target", "prob_target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kl_div_matches_eager(op_path, shape, reduction, log_target, dtype):
    x = log_probabilities(shape, dtype, 0)
    y = log_probabilities(shape, dtype, 1)
    if not log_target:
        y = y.detach().exp().requires_grad_()
    loss = kl_div(x, y, reduction, log_target)
    expected = F.kl_div(x.float(), y.float(), reduction=reduction, log_target=log_target)
    assert loss.dtype == dtype and loss.shape == expected.shape
    compare(loss, expected, (x, y), dtype)


def test_kl_div_with_a_target_that_needs_no_gradient(op_path):
    x, y = log_probabilities((5, 200), seed=0), log_probabilities((5, 200), seed=1).detach()
    compare(kl_div(x, y, "batchmean", True), F.kl_div(x, y, reduction="batchmean", log_target=True), (x, y),
            torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_jsd_matches_eager(op_path, shape, beta, reduction):
    student, teacher = log_probabilities(shape, seed=0), log_probabilities(shape, seed=1)
    labels = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    labels.view(-1)[::3] = -100
    loss = jsd(student, teacher, labels, beta=beta, reduction=reduction)
    assert loss.dtype == torch.float32
    compare(loss, eager_jsd(student, teacher, labels, beta, reduction=reduction), (student, teacher), torch.float32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_bf16_without_labels_and_a_teacher_without_gradient(op_path, beta):
    student = log_probabilities((6, 500), torch.bfloat16, 0)
    teacher = log_probabilities((6, 500), torch.bfloat16, 1).detach()
    compare(jsd(student, teacher, beta=beta), eager_jsd(student, teacher, beta=beta), (student, teacher),
            torch.bfloat16)


def test_jsd_of_extreme_log_probabilities_is_finite(op_path):
    """Near-one-hot rows, whose probabilities underflow to 0 on both sides: the mixture's log stays finite."""
    student = log_probabilities((4, 300), seed=0, scale=2000.0)
    teacher = log_probabilities((4, 300), seed=1, scale=2000.0)
    loss = jsd(student, teacher, beta=0.5)
    assert torch.isfinite(loss)
    compare(loss, eager_jsd(student, teacher, beta=0.5), (student, teacher), torch.float32)  # finite gradients


def test_jsd_forward_only_computes_no_gradient(op_path):
    student, teacher = log_probabilities((3, 50), seed=0), log_probabilities((3, 50), seed=1)
    with torch.no_grad():
        loss = jsd(student, teacher, beta=0.3)
        _, dstudent, dteacher = torch.ops.liger.jsd_forward(student, teacher, None, 0.3, -100, "batchmean", False,
                                                            False)
    assert dstudent.numel() == 0 and dteacher.numel() == 0
    assert_close(loss, eager_jsd(student, teacher, beta=0.3).detach())


def test_jsd_a_second_backward_through_one_loss_is_refused(op_path):
    student, teacher = log_probabilities((3, 50), seed=0), log_probabilities((3, 50), seed=1)
    loss = jsd(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(LigerOpError, match="liger::jsd: backward ran twice"):
        loss.backward()


def test_jsd_with_every_row_ignored_is_nan_as_a_mean_over_nothing(op_path):
    student, teacher = log_probabilities((3, 50), seed=0), log_probabilities((3, 50), seed=1)
    labels = torch.full((3,), -100, device=DEVICE)
    assert torch.isnan(jsd(student, teacher, labels)) and jsd(student, teacher, labels, reduction="sum") == 0


def test_opcheck(op_path):
    x, y = log_probabilities((5, 70), seed=0), log_probabilities((5, 70), seed=1)
    labels = torch.tensor([1, -100, 3, 4, 5], device=DEVICE)
    opcheck(torch.ops.liger.kl_div.default, (x, y, "batchmean", True))
    opcheck(torch.ops.liger.kl_div.default, (x, y.detach().exp(), "none", False))
    opcheck(torch.ops.liger.jsd_forward.default, (x, y, labels, 0.3, -100, "batchmean", True, True))
    opcheck(torch.ops.liger.jsd_forward.default, (x, y.detach(), None, 1.0, -100, "sum", True, False))


def test_bad_input_gets_a_clear_error():
    x, y = log_probabilities((5, 70), seed=0), log_probabilities((5, 70), seed=1)
    with pytest.raises(LigerOpError, match=r"liger::kl_div: input \(5, 70\) and target \(5, 1\) must have one"):
        kl_div(x, y[:, :1])
    with pytest.raises(LigerOpError, match="liger::kl_div: reduction must be one of"):
        kl_div(x, y, "average")
    with pytest.raises(LigerOpError, match=r"liger::jsd: beta must be in \[0, 1\]"):
        jsd(x, y, beta=1.5)
    with pytest.raises(LigerOpError, match="liger::jsd: labels must hold one int64 or int32 label per row"):
        jsd(x, y, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(LigerOpError, match="liger::jsd: student_logp must be float32"):
        jsd(x.double(), y)


def test_nn_modules_match_their_eager_counterparts(op_path):
    x, y = log_probabilities((2, 3, 40), seed=0), log_probabilities((2, 3, 40), seed=1)
    assert_close(liger_compile.nn.KLDivLoss("batchmean", log_target=True)(x, y),
                 torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(x, y))
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]], device=DEVICE)
    assert_close(liger_compile.nn.JSD(beta=0.3)(x, y, labels), eager_jsd(x, y, labels, beta=0.3))
