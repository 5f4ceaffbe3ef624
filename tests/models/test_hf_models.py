"""Tiny transformers models compiled with the liger backend: rewrite counts and exact training parity."""

import copy

import pytest
import torch
from expecttest import TestCase

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report, tiny_causal_lm


# Config values a tiny vocabulary needs (Phi-3's default pad token id is 32000).
OVERRIDES = {"phi3": dict(pad_token_id=0), "gpt_neox": dict(rotary_pct=0.5)}


def train_step_parity(model_type, compiler="aot_eager", checkpointing=False, options=None, **overrides):
    """One forward+backward of the compiled model against eager: returns the rewrite report."""
    model = tiny_causal_lm(model_type, **{**OVERRIDES.get(model_type, {}), **overrides}).to(DEVICE).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    actual, report = compile_and_report(lambda i: model(input_ids=i, labels=i), ids, compiler=compiler,
                                        **(options or {}))
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
        # norms: 2 layers x (input + post-attention) + final; one SwiGLU MLP (with its down projection) and one
        # q+k RoPE per layer; the loss, on logits the model also returns (optimize() drops them to fuse the
        # lm_head); the token embedding
        report = train_step_parity("llama")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertEqual({r.variant for r in report.rewrites},
                         {"fp32", "swiglu + down projection", "q+k", "logits (the logits are also used elsewhere, e.g. returned)",
                          "F.embedding"})
        self.assertIn("model.layers.0.input_layernorm @ modeling_llama.py:", report.rewrites[0].location)

    def test_mistral(self):
        # as Llama
        report = train_step_parity("mistral")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")

    def test_gemma(self):
        # Gemma's (1 + weight) norms: same 5 as Llama; its MLP is GeGLU with gelu_pytorch_tanh
        report = train_step_parity("gemma")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertIn("geglu_tanh + down projection", {r.variant for r in report.rewrites})

    def test_qwen3(self):
        # Llama's 5 plus q_norm and k_norm over head_dim in each layer
        report = train_step_parity("qwen3")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 9, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")

    def test_phi3(self):
        # one fused gate_up projection per layer, split by chunk: read whole by the packed op
        report = train_step_parity("phi3")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertIn("swiglu packed", {r.variant for r in report.rewrites})

    def test_qwen2(self):
        # as Llama (q/k/v projections with bias)
        report = train_step_parity("qwen2")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")

    def test_gpt_neox(self):
        # LayerNorms: 2 layers x (input + post-attention, parallel residual) + final; a plain GELU MLP; RoPE
        # partial (half of head_dim rotated), q and k split from one fused qkv projection
        report = train_step_parity("gpt_neox")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 5, 'rms_norm': 0, 'residual_norm': 0, 'glu': 0, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertEqual({r.variant for r in report.rewrites if r.family == "rope"}, {"q+k partial"})

    def test_gpt2(self):
        # LayerNorms: 2 layers x (ln_1 + ln_2) + ln_f; learned positions, no RoPE; a GELU MLP
        report = train_step_parity("gpt2")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 5, 'rms_norm': 0, 'residual_norm': 0, 'glu': 0, 'rope': 0, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 2, 'int2_matmul': 0}""")

    def test_phi(self):
        # one LayerNorm per layer (attention and MLP in parallel) + final; partial RoPE
        report = train_step_parity("phi")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 3, 'rms_norm': 0, 'residual_norm': 0, 'glu': 0, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")

    def test_cohere(self):
        # LayerNorm written out in fp32 without bias (one per layer, parallel block, + final): the arithmetic
        # matcher; Cohere's interleaved RoPE is not rotate_half
        report = train_step_parity("cohere")
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 3, 'rms_norm': 0, 'residual_norm': 0, 'glu': 2, 'rope': 0, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertEqual({r.variant for r in report.rewrites if r.family == "layer_norm"},
                         {"arithmetic * weight (cast back)"})

    def test_phi3_partial_rotary(self):
        # Phi-3 with partial_rotary_factor (as Phi-4-mini): the op rotates 3/4 of each head, passes the rest
        report = train_step_parity("phi3", partial_rotary_factor=0.75)
        self.assertIn("q+k partial", {r.variant for r in report.rewrites})
        self.assertEqual(report.counts()["rope"], 2)

    def test_llama_residual_norm(self):
        # with the residual family on: every norm but the first reads a residual sum (post-attention norms
        # and the next layer's input norm, and the final norm): 4 of the 5 take their sum with them
        report = train_step_parity("llama", options={"residual_norm": True})
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 4, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")

    def test_llama_with_gradient_checkpointing(self):
        # the per-layer norms and MLPs now sit inside checkpoint bodies (nested graphs): still found; without a
        # cache transformers masks for packed sequences, a mask built outside the layers from default positions,
        # which evaluates to the causal one: both attentions become is_causal
        report = train_step_parity("llama", checkpointing=True)
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 2, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")


@pytest.mark.skipif(DEVICE == "cpu", reason="Inductor's CPU codegen costs ~30 s a model; the e2e test covers it")
@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen3", "phi3", "gpt_neox"])
def test_inductor_parity(model_type):
    report = train_step_parity(model_type, compiler="inductor")
    assert report.counts()["rope"] > 0
    if model_type == "gpt_neox":  # LayerNorm and a plain GELU MLP
        assert report.counts()["layer_norm"] > 0
    else:
        assert report.counts()["rms_norm"] > 0 and report.counts()["glu"] > 0


@pytest.mark.parametrize("model_type,variant,overrides", [
    ("llama", "fused linear", {}), ("gemma2", "fused linear softcap", {}), ("qwen2", "fused linear", {}),
    # logit scales (powers of two, moved onto the lm_head's input): Granite divides, Cohere multiplies
    ("granite", "fused linear", dict(logits_scaling=8.0)), ("cohere", "fused linear", dict(logit_scale=0.0625)),
])
def test_optimize_fuses_lm_head_and_loss_in_training(model_type, variant, overrides):
    """optimize() drops the training logits, so the lm_head and the loss fuse; eval mode keeps them."""
    model = tiny_causal_lm(model_type, **overrides).to(DEVICE).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    compiled = liger_compile.optimize(model, compiler="aot_eager")
    with collect() as report:
        output = compiled(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(25, device=DEVICE))
    output.loss.backward()
    expected = reference(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(25, device=DEVICE))
    expected.loss.backward()
    assert output.logits is None
    assert [r.variant for r in report.rewrites if r.family == "cross_entropy"] == [variant]
    assert_close(output.loss, expected.loss)
    for param, ref_param in zip(model.parameters(), reference.parameters()):
        assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        evaluated = compiled(input_ids=ids, labels=ids)
    assert_close(evaluated.logits, reference.eval()(input_ids=ids).logits)
