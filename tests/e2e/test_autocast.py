"""Mixed precision: fp32 parameters under torch.autocast, and bf16 parameters without it, give eager's dtypes and
numerics. The passes make autocast's implicit casts explicit where the op they write takes a linear's place; the
ops that stand for autocast-listed PyTorch ops (F.linear, F.kl_div) follow autocast when called eagerly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error, tiny_causal_lm, variants

AUTOCAST = dict(device_type=DEVICE, dtype=torch.bfloat16)


def parity(model, step, *, fused: bool, tolerance: float):
    """`step(model)` compiled (with the lm_head fused into the loss or not) against eager: loss, dtypes and every
    parameter gradient. Returns the report."""
    reference = copy.deepcopy(model)
    expected = step(reference)
    expected.backward()
    compiled = (liger_compile.optimize(model, compiler="aot_eager") if fused else
                torch.compile(model, backend="liger", options={"compiler": "aot_eager"}))
    with collect() as report:
        actual = step(compiled)
    actual.backward()
    assert not report.failures, str(report)
    assert actual.dtype == expected.dtype
    assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    for (name, param), expected_param in zip(model.named_parameters(), reference.parameters()):
        if not param.requires_grad:
            continue
        assert param.grad.dtype == expected_param.grad.dtype, name
        assert_relative_error(param.grad, expected_param.grad, tolerance)
    return report


def causal_lm_loss(ids, autocast: bool):
    def step(model):
        with torch.autocast(**AUTOCAST, enabled=autocast):
            return model(input_ids=ids, labels=ids).loss
    return step


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_fp32_parameters_under_autocast(fused):
    """Every family is rewritten: RoPE promotes the autocast linear's bf16 q and k with fp32 cos and sin, and the
    fused lm_head computes in bf16 as the autocast linear did."""
    model = tiny_causal_lm("llama").to(DEVICE).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    report = parity(model, causal_lm_loss(ids, autocast=True), fused=fused, tolerance=1e-2)
    counts = report.counts()
    assert (counts["rms_norm"], counts["glu"], counts["rope"], counts["cross_entropy"], counts["embedding"]) == (
        5, 2, 2, 1, 1), str(report)
    assert not report.near_misses, str(report)
    assert ("fused linear" in variants(report, "cross_entropy")[-1]) == fused


def test_bf16_parameters_without_autocast():
    model = tiny_causal_lm("llama").to(DEVICE).to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    report = parity(model, causal_lm_loss(ids, autocast=False), fused=True, tolerance=2e-2)
    assert sum(report.counts().values()) == 5 + 2 + 2 + 1 + 1, str(report)  # norms, GLUs, RoPEs, loss, embedding


class Distillation(nn.Module):
    """A student and a frozen teacher lm_head; KL and JSD of their log-probabilities at a temperature."""

    def __init__(self, loss: str):
        super().__init__()
        torch.manual_seed(0)
        self.student, self.teacher = nn.Linear(32, 96, bias=False), nn.Linear(32, 96, bias=False)
        self.teacher.requires_grad_(False)
        self.loss = loss

    def forward(self, student_hidden, teacher_hidden):
        student = F.log_softmax(self.student(student_hidden).float() / 2.0, dim=-1)
        teacher = F.log_softmax(self.teacher(teacher_hidden).float() / 2.0, dim=-1)
        if self.loss == "kl_div":  # 16-bit log-probabilities, which autocast's kl_div takes in fp32
            return F.kl_div(student.bfloat16(), teacher.bfloat16(), reduction="batchmean", log_target=True)
        mixture = torch.log(0.5 * student.exp() + 0.5 * teacher.exp())
        return 0.5 * F.kl_div(mixture, teacher, reduction="sum", log_target=True) + 0.5 * F.kl_div(
            mixture, student, reduction="sum", log_target=True)


@pytest.mark.parametrize("loss,variant", [("kl_div", "kl_div batchmean"), ("jsd", "fused linear jsd")])
def test_distillation_losses_under_autocast(loss, variant):
    model = Distillation(loss).to(DEVICE)
    torch.manual_seed(1)
    hidden = [torch.randn(2, 8, 32, device=DEVICE) for _ in range(2)]

    def step(module):
        with torch.autocast(**AUTOCAST):
            return module(*hidden)
    report = parity(model, step, fused=False, tolerance=1e-2)
    assert [r.variant for r in report.rewrites] == [variant], str(report)


def test_eager_ops_follow_autocast_as_the_pytorch_ops_they_stand_for():
    torch.manual_seed(0)
    hidden = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(96, 32, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 96, (6,), device=DEVICE)
    with torch.autocast(**AUTOCAST):
        loss = liger_compile.ops.fused_linear_cross_entropy(hidden, weight, labels)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), labels)  # the lm_head in bf16
        log_p, log_q = (F.log_softmax(torch.randn(4, 96, device=DEVICE), -1).bfloat16() for _ in range(2))
        divergence = liger_compile.ops.kl_div(log_p, log_q, "none", True)
        expected_divergence = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    assert loss.dtype == expected.dtype == torch.float32
    assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert divergence.dtype == expected_divergence.dtype == torch.float32
    assert_close(divergence, expected_divergence)
