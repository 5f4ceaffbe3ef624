"""Models written by hand, outside transformers: rewrite counts and exact forward/backward parity."""

import copy

import torch
import torch.nn.functional as F
from expecttest import TestCase

from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report
from tests.models.custom_models import VOCAB, FusedLlama, MetaLlama, NanoGPT


def loss_fn(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def parity(model_class):
    """Loss and every gradient of the compiled model against eager; returns the rewrite report."""
    torch.manual_seed(0)
    model = model_class().to(DEVICE)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    expected = loss_fn(reference, ids)
    expected.backward()
    actual, report = compile_and_report(lambda i: loss_fn(model, i), ids)
    actual.backward()
    assert_close(actual, expected)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-5)
    assert not report.failures, str(report)
    return report


class TestCustomModels(TestCase):
    def test_nanogpt(self):
        # LayerNorm: 2 layers x (ln_1 + ln_2) + ln_f; an ungated GELU MLP and learned position embeddings
        self.assertExpectedInline(
            str(parity(NanoGPT).counts()), """{'layer_norm': 5, 'rms_norm': 0, 'residual_norm': 0, 'glu': 0, 'rope': 0, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 2, 'int2_matmul': 0}""")

    def test_meta_reference_llama(self):
        # 2 layers x (attention_norm + ffn_norm) + final norm, all `.type_as(x) * weight`; w2(silu(w1(x)) * w3(x));
        # RoPE by complex multiplication (interleaved pairs): reported for xq and xk, not rewritten
        report = parity(MetaLlama)
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 0, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertEqual([m.family for m in report.near_misses], ["rope"] * 4)
        self.assertIn("view_as_complex", report.near_misses[0].reason)

    def test_fused_gate_up_llama(self):
        # 2 layers x (norm_1 + norm_2) + final norm, nn.RMSNorm; one fused gate_up per layer, read whole;
        # rotate_half RoPE on (B, T, H, D) heads, q and k together
        report = parity(FusedLlama)
        self.assertExpectedInline(
            str(report.counts()), """{'layer_norm': 0, 'rms_norm': 5, 'residual_norm': 0, 'glu': 2, 'rope': 2, 'attention': 0, 'cross_entropy': 1, 'divergence': 0, 'embedding': 1, 'int2_matmul': 0}""")
        self.assertEqual({r.variant for r in report.rewrites if r.family == "glu"}, {"swiglu packed"})
        self.assertEqual(report.near_misses, [])
