"""Activation checkpointing: the rewrites happen inside checkpointed regions (nested graphs Dynamo makes of them),
with plain and selective checkpointing, and training matches eager."""

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report, tiny_causal_lm

HIDDEN = 64


class Block(nn.Module):
    """Pre-norm SwiGLU MLP with a residual, checkpointed as a whole."""

    def __init__(self, context_fn=None):
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.gate, self.up = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False), nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        self.context_fn = context_fn

    def mlp(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, x):
        if self.context_fn is None:
            return checkpoint(self.mlp, x, use_reentrant=False)
        return checkpoint(self.mlp, x, use_reentrant=False, context_fn=self.context_fn)


def save_matmuls(ctx, op, *args, **kwargs):
    """A selective checkpointing policy: keep matmul outputs, recompute everything else."""
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_rewrites_inside_checkpointed_regions(selective):
    context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls) if selective else None
    torch.manual_seed(0)
    module = Block(context_fn).to(DEVICE)
    reference = copy.deepcopy(module)
    x = torch.randn(2, 8, HIDDEN, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    expected = reference(x_ref)
    expected.sum().backward()
    actual, report = compile_and_report(module, x)
    actual.sum().backward()

    assert not report.failures, str(report)
    assert (report.counts()["rms_norm"], report.counts()["glu"]) == (1, 1), str(report)
    assert_close(actual, expected)
    assert_close(x.grad, x_ref.grad, rtol=1e-4)
    for param, expected_param in zip(module.parameters(), reference.parameters()):
        assert_close(param.grad, expected_param.grad, rtol=1e-4)


def test_hf_gradient_checkpointing_non_reentrant():
    model = tiny_causal_lm("llama").to(DEVICE).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    actual, report = compile_and_report(lambda i: model(input_ids=i, labels=i).loss, ids)
    actual.backward()

    counts = report.counts()
    assert (counts["rms_norm"], counts["glu"], counts["rope"], counts["cross_entropy"]) == (5, 2, 2, 1), str(report)
    assert_close(actual, expected)
    for (name, param), expected_param in zip(model.named_parameters(), reference.parameters()):
        assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True], ids=["wrapped", "inplace"])
def test_optimize_fuses_the_lm_head_of_a_checkpointed_hf_model_in_a_plain_training_loop(inplace):
    """A plain loop (not HF's Trainer, which turns `use_cache` off) leaves `use_cache` on: transformers then warns
    once per call that checkpointing turns it off, which would break the graph before the lm_head, keep the
    logits an output of the loss's graph, and leave the lm_head unfused."""
    model = tiny_causal_lm("llama").to(DEVICE).train()
    assert model.config.use_cache
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    with collect() as report:
        actual = liger_compile.optimize(model, compiler="aot_eager", inplace=inplace)(input_ids=ids, labels=ids).loss
    actual.backward()

    assert len(report.graphs) == 1, str(report)
    assert [r.variant for r in report.graphs[0].rewrites if r.family == "cross_entropy"] == ["fused linear"], str(report)
    assert_close(actual, expected)
    for param, expected_param in zip(model.parameters(), reference.parameters()):
        assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-5)
    assert logging.Logger.warning_once not in torch._dynamo.config.ignore_logging_functions  # only while tracing
