"""The divergence rewrites: the generalized JSD in each spelling distillation code uses (plain and fused with both
lm_heads), F.kl_div alone, and near-misses left alone and reported; loss and gradients equal eager's."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE
from tests.helpers import assert_close, assert_relative_error, compile_and_report

pytestmark = pytest.mark.filterwarnings("ignore:reduction. .mean. divides")

BATCH, SEQ, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 2, 5, 16, 24, 40


def anchor_mixture(student, teacher):  # beta 0.5 as ../shared/anchors.md writes it, on log-probabilities
    student, teacher = student.float(), teacher.float()
    log_mixture = (0.5 * (student.exp() + teacher.exp())).log()
    return 0.5 * (F.kl_div(log_mixture, teacher, reduction="sum", log_target=True)
                  + F.kl_div(log_mixture, student, reduction="sum", log_target=True)) / student.shape[0]


def trl_gkd(student, teacher, beta=0.3):  # TRL's generalized_jsd_loss (labels=None), weights as 0-d tensors
    beta = torch.tensor(beta, dtype=student.dtype)
    mixture = torch.logsumexp(torch.stack([student + torch.log(1 - beta), teacher + torch.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / (jsd.size(0) * jsd.size(1))


def weighted_batchmean(student, teacher, beta=0.7):  # explicit weights, logaddexp, batchmean reductions
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
    return (beta * F.kl_div(mixture, teacher, reduction="batchmean", log_target=True)
            + (1 - beta) * F.kl_div(mixture, student, reduction="batchmean", log_target=True))


def exp_weights_mean(student, teacher):  # log(w_t exp(t) + w_s exp(s)), the KLs reduced by "mean", divided
    mixture = torch.log(0.25 * torch.exp(teacher) + 0.75 * torch.exp(student))
    return (0.25 * F.kl_div(mixture, teacher, reduction="mean", log_target=True)
            + F.kl_div(mixture, student, reduction="mean", log_target=True) * 0.75) / 3


class Distillation(nn.Module):
    """Student and teacher lm_heads, log_softmax at a temperature (after an upcast), and a divergence `loss`."""

    def __init__(self, loss, temperature=2.0, teacher_temperature=None, bias=False):
        super().__init__()
        self.student_head = nn.Linear(STUDENT_HIDDEN, VOCAB, bias=bias)
        self.teacher_head = nn.Linear(TEACHER_HIDDEN, VOCAB, bias=False).requires_grad_(False)
        self.loss, self.temperature = loss, temperature
        self.teacher_temperature = teacher_temperature or temperature

    def forward(self, student_hidden, teacher_hidden):
        student = F.log_softmax(self.student_head(student_hidden).float() / self.temperature, dim=-1)
        teacher = F.log_softmax(self.teacher_head(teacher_hidden).float() / self.teacher_temperature, dim=-1)
        return self.loss(student, teacher)


class OnLogProbabilities(nn.Module):
    """A divergence `loss` on given log-probabilities (nothing to fuse)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, student, teacher):
        return self.loss(student, teacher)


def log_probabilities(dtype, requires_grad, seed):
    torch.manual_seed(seed)
    x = torch.randn(BATCH, SEQ, VOCAB, device=DEVICE).log_softmax(-1).to(dtype)
    return x.requires_grad_(requires_grad)


def run(module, inputs, dtype=torch.float32, **options):
    module = module.to(DEVICE)
    expected = module(*inputs)
    wanted = [t for t in (*inputs, *module.parameters()) if t.requires_grad]
    expected_grads = torch.autograd.grad(expected, wanted)
    actual, report = compile_and_report(module, *inputs, **options)
    grads = torch.autograd.grad(actual, wanted)
    assert not report.failures, str(report)
    assert actual.dtype == expected.dtype
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    assert_close(actual, expected, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        if dtype == torch.float32:
            assert_close(grad, expected_grad, **tolerance)
        else:  # eager rounds each bf16 intermediate, the ops compute in fp32: compare gradients as a whole
            assert_relative_error(grad, expected_grad, 1e-2)
    return report


def hidden_states(dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(BATCH, SEQ, STUDENT_HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True),
            torch.randn(BATCH, SEQ, TEACHER_HIDDEN, device=DEVICE, dtype=dtype))


def variants(report):
    return [r.variant for r in report.rewrites if r.family == "divergence"]


def reasons(report):
    return [m.reason for m in report.near_misses if m.family == "divergence"]


SPELLINGS = [anchor_mixture, trl_gkd, weighted_batchmean, exp_weights_mean]


@pytest.mark.parametrize("loss", SPELLINGS, ids=lambda f: f.__name__)
def test_jsd_spellings_fuse_with_both_lm_heads(loss):
    assert variants(run(Distillation(loss), hidden_states())) == ["fused linear jsd"]


def test_bf16_lm_heads_upcast_before_the_temperature_fuse():
    module = Distillation(trl_gkd).to(torch.bfloat16)
    assert variants(run(module, hidden_states(torch.bfloat16), torch.bfloat16)) == ["fused linear jsd"]


@pytest.mark.parametrize("loss", SPELLINGS, ids=lambda f: f.__name__)
def test_jsd_on_given_log_probabilities_both_needing_gradients(loss):
    inputs = log_probabilities(torch.float32, True, 0), log_probabilities(torch.float32, True, 1)
    assert variants(run(OnLogProbabilities(loss), inputs)) == [
        "jsd (log-probabilities not made by log_softmax(linear(h, W) [/ T]))"]


def test_upcast_bf16_log_probabilities_are_read_as_they_are():
    inputs = log_probabilities(torch.bfloat16, True, 0), log_probabilities(torch.bfloat16, False, 1)
    report = run(OnLogProbabilities(anchor_mixture), inputs, torch.bfloat16)
    assert variants(report) == ["jsd (log-probabilities not made by log_softmax(linear(h, W) [/ T]))"]


@pytest.mark.parametrize("module, why", [
    (lambda: Distillation(trl_gkd, temperature=2.0, teacher_temperature=3.0), "different temperatures"),
    (lambda: Distillation(trl_gkd, bias=True), "log-probabilities not made by log_softmax(linear(h, W) [/ T])"),
], ids=["temperatures", "bias"])
def test_unfusable_lm_heads_keep_the_plain_op(module, why):
    report = run(module(), hidden_states())
    assert len(variants(report)) == 1 and why in variants(report)[0]


def test_a_teacher_head_that_needs_a_gradient_keeps_the_plain_op():
    module = Distillation(trl_gkd)
    module.teacher_head.requires_grad_(True)
    assert variants(run(module, hidden_states())) == [
        "jsd (the teacher's lm_head input or weight needs a gradient)"]


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [True, False], ids=["log_target", "prob_target"])
def test_kl_div_alone(reduction, log_target):
    def loss(student, teacher):
        target = teacher if log_target else teacher.exp()
        return F.kl_div(student, target, reduction=reduction, log_target=log_target)
    inputs = log_probabilities(torch.float32, True, 0), log_probabilities(torch.float32, False, 1)
    assert variants(run(OnLogProbabilities(loss), inputs)) == [f"kl_div {reduction}"]


def test_forward_and_reverse_kl_are_kl_divs():
    def loss(student, teacher):
        return (F.kl_div(student, teacher, reduction="batchmean", log_target=True)
                + F.kl_div(teacher, student, reduction="batchmean", log_target=True))
    inputs = log_probabilities(torch.float32, True, 0), log_probabilities(torch.float32, True, 1)
    assert variants(run(OnLogProbabilities(loss), inputs)) == ["kl_div batchmean"] * 2


def mixture_weighted_unlike_terms(student, teacher):
    mixture = (0.5 * (student.exp() + teacher.exp())).log()
    return (0.3 * F.kl_div(mixture, teacher, reduction="sum", log_target=True)
            + 0.5 * F.kl_div(mixture, student, reduction="sum", log_target=True))


def weights_not_summing_to_one(student, teacher):
    mixture = (0.5 * student.exp() + 0.6 * teacher.exp()).log()
    return (F.kl_div(mixture, teacher, reduction="sum", log_target=True)
            + F.kl_div(mixture, student, reduction="sum", log_target=True))


def bf16_arithmetic(student, teacher):
    mixture = (0.5 * (student.exp() + teacher.exp())).log()
    return (F.kl_div(mixture, teacher, reduction="sum", log_target=True)
            + F.kl_div(mixture, student, reduction="sum", log_target=True))


@pytest.mark.parametrize("loss, dtype, reason", [
    (mixture_weighted_unlike_terms, torch.float32, "not a Jensen-Shannon divergence"),
    (weights_not_summing_to_one, torch.float32, "do not sum to 1"),
    (bf16_arithmetic, torch.bfloat16, "the JSD arithmetic is in torch.bfloat16"),
    (lambda s, t: F.kl_div(s, t, reduction="none", log_target=True).sum(-1).mean(), torch.float32,
     "reduction 'none'"),
    (lambda s, t: F.kl_div(s, t[:, :1], reduction="sum", log_target=True), torch.float32, "broadcast"),
], ids=["weighted_unlike", "weights_sum", "bf16", "unreduced_kl", "broadcast"])
def test_near_misses_are_reported_not_rewritten_as_a_jsd(loss, dtype, reason):
    inputs = log_probabilities(dtype, True, 0), log_probabilities(dtype, False, 1)
    report = run(OnLogProbabilities(loss), inputs, dtype)
    assert not any(v.startswith(("jsd", "fused")) for v in variants(report)), str(report)
    assert any(reason in r for r in reasons(report)), str(report)


def labels_with_ignored_rows():
    torch.manual_seed(2)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE)
    labels[0, :2] = -100  # a prompt
    labels[1] = -100  # a row with nothing to learn
    return labels


def masked_gkd(labels, reduce="sum_over_count", beta=0.3):
    """TRL's generalized_jsd_loss with labels: the per-token JSD of the rows not ignored, by boolean indexing."""
    def loss(student, teacher):
        weight = torch.tensor(beta, dtype=student.dtype, device=student.device)
        mixture = torch.logsumexp(torch.stack([student + torch.log1p(-weight), teacher + torch.log(weight)]), dim=0)
        jsd = (weight * F.kl_div(mixture, teacher, reduction="none", log_target=True)
               + (1 - weight) * F.kl_div(mixture, student, reduction="none", log_target=True))
        mask = labels != -100
        if reduce == "elements":  # a mask over elements, not rows
            return jsd[jsd > 1e-3].sum()
        kept = jsd[mask]
        return kept.mean() if reduce == "mean" else kept.sum() / mask.sum().clamp_min(1)
    return loss


def run_tracing_masks(module, inputs):
    """`run`, with Dynamo tracing boolean indexing (a data-dependent shape) instead of breaking the graph there."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return run(module, inputs)


def test_rows_masked_by_labels_fuse_with_both_lm_heads():
    report = run_tracing_masks(Distillation(masked_gkd(labels_with_ignored_rows())), hidden_states())
    assert variants(report) == ["fused linear jsd"], str(report)


def test_rows_masked_by_labels_on_log_probabilities():
    inputs = log_probabilities(torch.float32, True, 0), log_probabilities(torch.float32, False, 1)
    report = run_tracing_masks(OnLogProbabilities(masked_gkd(labels_with_ignored_rows())), inputs)
    assert variants(report) == ["jsd (log-probabilities not made by log_softmax(linear(h, W) [/ T]))"], str(report)


def test_masked_rows_averaged_or_a_mask_over_elements_are_left_alone():
    """The mean of the kept rows divides by a count known only when it runs; a mask over elements is no row
    selection: neither is rewritten as a JSD."""
    inputs = log_probabilities(torch.float32, True, 0), log_probabilities(torch.float32, False, 1)
    labels = labels_with_ignored_rows()
    report = run_tracing_masks(OnLogProbabilities(masked_gkd(labels, reduce="mean")), inputs)
    assert variants(report) == [] and any("known only when it runs" in r for r in reasons(report)), str(report)
    report = run_tracing_masks(OnLogProbabilities(masked_gkd(labels, reduce="elements")), inputs)
    assert variants(report) == [], str(report)


def test_family_switched_off():
    assert variants(run(Distillation(trl_gkd), hidden_states(), divergence=False)) == []
