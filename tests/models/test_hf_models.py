"""Tiny transformers models compiled with the liger backend: rewrite counts and exact training parity."""

import copy

import pytest
import torch
from expecttest import TestCase

from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report, tiny_causal_lm


def train_step_parity(model_type, compiler="aot_eager", checkpointing=False):
    """One forward+backward of the compiled model against eager: returns the rewrite report."""
    model = tiny_causal_lm(model_type).to(DEVICE).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    actual, report = compile_and_report(lambda i: model(input_ids=i, labels=i), ids, compiler=compiler)
    actual.loss.backward()

    assert_close(actual.loss, expected.loss)
    assert_close(actual.logits, expected.logits)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert param.grad is not None, name
        assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-5)
    assert not report.failures, str(report)
    return report


class TestRewriteCounts(TestCase):
    """Expected rewrites per family for 2-layer models (reviewed by hand: see each comment)."""

    def test_llama(self):
        # 2 layers x (input + post-attention norm) + final norm
        report = train_step_parity("llama")
        self.assertExpectedInline(str(report.counts()), """{'rms_norm': 5}""")
        self.assertEqual({r.variant for r in report.rewrites}, {"fp32"})
        self.assertIn("model.layers.0.input_layernorm @ modeling_llama.py:", report.rewrites[0].location)

    def test_gemma(self):
        # Gemma's (1 + weight) norms: same 5 as Llama
        report = train_step_parity("gemma")
        self.assertExpectedInline(str(report.counts()), """{'rms_norm': 5}""")

    def test_qwen3(self):
        # Llama's 5 plus q_norm and k_norm over head_dim in each layer
        report = train_step_parity("qwen3")
        self.assertExpectedInline(str(report.counts()), """{'rms_norm': 9}""")

    def test_llama_with_gradient_checkpointing(self):
        # the per-layer norms now sit inside checkpoint bodies (nested graphs): still 5
        report = train_step_parity("llama", checkpointing=True)
        self.assertExpectedInline(str(report.counts()), """{'rms_norm': 5}""")


@pytest.mark.skipif(DEVICE == "cpu", reason="Inductor's CPU codegen costs ~30 s a model; the e2e test covers it")
@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen3"])
def test_inductor_parity(model_type):
    report = train_step_parity(model_type, compiler="inductor")
    assert report.counts()["rms_norm"] > 0
