"""The cross-entropy rewrite: every spelling of the loss, with and without the lm_head fused, rewritten exactly
and with eager's loss and gradients; near-misses are left alone and reported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report

BATCH, SEQ, HIDDEN, VOCAB = 2, 9, 16, 50


class LMHeadLoss(nn.Module):
    """lm_head then a loss spelled by `loss`; returns the loss, and the logits too if `return_logits`."""

    def __init__(self, loss, return_logits=False, bias=False):
        super().__init__()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias)
        self.loss = loss
        self.return_logits = return_logits

    def forward(self, hidden, labels):
        logits = self.lm_head(hidden)
        loss = self.loss(logits, labels)
        return (loss, logits) if self.return_logits else loss


def hf_causal_lm_loss(logits, labels):  # transformers' ForCausalLMLoss, as written there
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, VOCAB)
    return F.cross_entropy(logits, shift_labels.view(-1), ignore_index=-100, reduction="mean")


def hf_loss_with_items(logits, labels):  # num_items_in_batch given: reduction "sum", then a division
    loss = F.cross_entropy(logits.float().view(-1, VOCAB), labels.view(-1), ignore_index=-100, reduction="sum")
    return loss / 7


def old_shift(logits, labels):  # logits[..., :-1, :] with labels[..., 1:]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return nn.CrossEntropyLoss()(shift_logits.view(-1, VOCAB), shift_labels.view(-1))


def short_index_shift(logits, labels):  # logits[:, :-1]: the last dim not indexed at all
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1))


def softcapped(logits, labels):  # Gemma 2's final_logit_softcapping before the loss
    logits = torch.tanh(logits / 30.0) * 30.0
    return hf_causal_lm_loss(logits, labels)


CLASS_WEIGHT = torch.rand(VOCAB) + 0.5
SPELLINGS = {
    "hf_for_causal_lm_loss": (hf_causal_lm_loss, "fused linear"),
    "num_items_in_batch": (hf_loss_with_items, "fused linear"),
    "old_shift": (old_shift, "fused linear"),
    "short_index_shift": (short_index_shift, "fused linear"),
    "softcap": (softcapped, "fused linear softcap"),
    "flatten": (lambda l, y: F.cross_entropy(l.flatten(0, 1), y.flatten(), reduction="none"), "fused linear"),
    "nn_module_options": (lambda l, y: nn.CrossEntropyLoss(weight=CLASS_WEIGHT.to(l.device), ignore_index=3,
                                                          label_smoothing=0.1)(l.reshape(-1, VOCAB),
                                                                               y.clamp(3).reshape(-1)),
                          "fused linear"),
}


def run(module, dtype=torch.float32, **options):
    torch.manual_seed(0)
    module = module.to(DEVICE, dtype)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE)
    labels[0, :3] = -100
    expected = module(hidden, labels)
    expected_loss = expected[0] if isinstance(expected, tuple) else expected
    expected_loss.sum().backward()
    expected_grads = [hidden.grad] + [p.grad for p in module.parameters()]
    hidden.grad = None
    module.zero_grad(set_to_none=True)
    actual, report = compile_and_report(module, hidden, labels, **options)
    actual_loss = actual[0] if isinstance(actual, tuple) else actual
    actual_loss.sum().backward()
    assert not report.failures, str(report)
    assert actual_loss.dtype == expected_loss.dtype
    assert_close(actual_loss, expected_loss, dtype)
    for grad, expected_grad in zip([hidden.grad] + [p.grad for p in module.parameters()], expected_grads):
        assert_close(grad, expected_grad, dtype)
    return report


def variants(report):
    return [r.variant for r in report.rewrites if r.family == "cross_entropy"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spellings_fuse_with_the_lm_head(spelling):
    loss, variant = SPELLINGS[spelling]
    assert variants(run(LMHeadLoss(loss))) == [variant]


def test_bias_and_bf16():
    assert variants(run(LMHeadLoss(hf_causal_lm_loss, bias=True), torch.bfloat16)) == ["fused linear"]


def test_returned_logits_keep_the_plain_op():
    report = run(LMHeadLoss(hf_causal_lm_loss, return_logits=True))
    assert variants(report) == ["logits (the logits are also used elsewhere, e.g. returned)"]


SCALED = {  # a logit scale as Granite (a division) and Cohere (a product) write it
    "divided": lambda l: l / 8.0,
    "times": lambda l: l * 2,
    "scalar_first": lambda l: 0.0625 * l,
    "one": lambda l: l / 1.0,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", SCALED)
def test_power_of_two_logit_scales_fuse(scale, bias, dtype):
    scaled = SCALED[scale]
    report = run(LMHeadLoss(lambda l, y: hf_causal_lm_loss(scaled(l), y), bias=bias), dtype)
    assert variants(report) == ["fused linear"]


def test_power_of_two_logit_scale_then_softcap_fuses():
    report = run(LMHeadLoss(lambda l, y: softcapped(l / 4.0, y)), torch.bfloat16)
    assert variants(report) == ["fused linear softcap"]


def test_power_of_two_scale_gives_bf16_logits_bit_for_bit():
    # Why the rewrite is exact: the scale moved onto the linear's input rounds to the same bf16 logits.
    torch.manual_seed(0)
    hidden = torch.randn(64, HIDDEN, dtype=torch.bfloat16) * 3
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)
    for divisor in (2.0, 8.0, 16.0, 0.5):
        assert torch.equal(F.linear(hidden, weight) / divisor, F.linear(hidden / divisor, weight))


def test_other_logit_scales_are_named_and_left_unfused():
    report = run(LMHeadLoss(lambda l, y: F.cross_entropy((l / 3.0).view(-1, VOCAB), y.view(-1))))
    assert variants(report) == ["logits (logits made by a linear layer divided by 3 (a logit scale, as in Granite "
                                "and Cohere): the fused op takes a power-of-two scale only, the one it can move "
                                "onto its input exactly)"]


def test_scaled_logits_whose_linear_output_is_read_elsewhere_stay_unfused():
    class AlsoReturnsRawLogits(LMHeadLoss):
        def forward(self, hidden, labels):
            logits = self.lm_head(hidden)
            return F.cross_entropy((logits * 2).view(-1, VOCAB), labels.view(-1)), logits

    report = run(AlsoReturnsRawLogits(None))
    assert variants(report) == ["logits (logits made by a linear layer times 2: the linear's output is read "
                                "elsewhere, or its shapes or dtypes do not fit the fused op)"]


def test_logits_not_from_a_linear_layer():
    report = run(LMHeadLoss(lambda l, y: F.cross_entropy(torch.tanh(l).view(-1, VOCAB), y.view(-1))))
    assert variants(report) == ["logits (logits not made by a linear layer (made by tanh))"]


def test_logits_from_another_graph_fragment_are_reported_as_such():
    def loss_after_a_graph_break(logits, labels):
        torch._dynamo.graph_break()  # as a DDP bucket or FSDP module boundary between lm_head and loss would
        return hf_causal_lm_loss(logits, labels)

    report = run(LMHeadLoss(loss_after_a_graph_break))
    assert variants(report) == ["logits (the logits are an input of this graph: what made them is in another one "
                                "(a graph break, a DDP bucket or an FSDP module boundary))"]


def test_bf16_loss_without_upcast_keeps_its_dtype():
    report = run(LMHeadLoss(lambda l, y: F.cross_entropy(l.view(-1, VOCAB), y.view(-1))), torch.bfloat16)
    assert variants(report) == ["fused linear"]


def test_softcap_after_the_upcast_stays_in_the_graph():
    """tanh in fp32 on upcast bf16 logits is not the op's softcap (which rounds in the logits' dtype)."""
    def fp32_softcap(logits, labels):
        x = logits.float()
        return F.cross_entropy((torch.tanh(x / 30.0) * 30.0).view(-1, VOCAB), labels.view(-1))
    assert variants(run(LMHeadLoss(fp32_softcap), torch.bfloat16)) == [
        "logits softcap (the logits are cast before the softcap (the fused op's softcap rounds in the logits' dtype))"]


def test_family_switched_off():
    report = run(LMHeadLoss(hf_causal_lm_loss), cross_entropy=False)
    assert variants(report) == []


@pytest.mark.parametrize("loss,reason", [
    (lambda l, y: F.cross_entropy(l.view(-1, VOCAB), F.one_hot(y.view(-1).clamp(0), VOCAB).float()),
     "class probabilities"),
    (lambda l, y: F.cross_entropy(l.transpose(1, 2), y.clamp(0)), "class dim last"),
    (lambda l, y: F.cross_entropy(l.view(-1, VOCAB), y.view(-1), reduce=False), "legacy size_average"),
], ids=["probabilities", "class_dim_1", "legacy_reduce"])
def test_near_misses_are_reported_not_rewritten(loss, reason):
    report = run(LMHeadLoss(loss))
    assert variants(report) == []
    assert any(reason in m.reason for m in report.near_misses if m.family == "cross_entropy"), str(report)
