"""Inference: under no_grad / inference_mode the ops compute forward only (the fused losses are told no gradient
is wanted, nothing is kept for backward), eval keeps the logits, and greedy generate() gives eager's tokens."""

import copy
import importlib

import pytest
import torch

import liger_compile
from tests.conftest import DEVICE
from tests.helpers import assert_close, tiny_causal_lm, variants

flce = importlib.import_module("liger_compile.ops.fused_linear_cross_entropy")  # the module, not the function


def ids_and_model():
    model = tiny_causal_lm("llama").to(DEVICE)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return ids, model


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_grad_computes_the_loss_forward_only(no_grad, monkeypatch):
    ids, model = ids_and_model()
    model.train()  # the fused loss path, as in a validation step of a training loop
    expected = copy.deepcopy(model)(input_ids=ids, labels=ids).loss
    chunk_calls = []
    chunked = flce._chunked

    def recording_chunked(*args):
        chunk_calls.append(args[-1])  # which gradients the forward computes along
        return chunked(*args)

    monkeypatch.setattr(flce, "_chunked", recording_chunked)
    with no_grad(), liger_compile.report.collect() as report:
        loss = liger_compile.optimize(model, compiler="aot_eager")(input_ids=ids, labels=ids).loss
    assert loss.grad_fn is None  # nothing kept for a backward
    assert_close(loss, expected)
    assert "fused linear" in variants(report, "cross_entropy")[-1], str(report)
    assert chunk_calls == [(False, False, False)]


def test_eval_keeps_the_logits():
    ids, model = ids_and_model()
    model.eval()
    expected = copy.deepcopy(model)(input_ids=ids, labels=ids)
    with torch.no_grad():
        actual = liger_compile.optimize(model, compiler="aot_eager")(input_ids=ids, labels=ids)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)


def test_greedy_generate_gives_eager_tokens():
    ids, model = ids_and_model()
    model.eval()
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    # the forward compiled: prefill and then one token at a time, with the KV cache growing
    model.forward = torch.compile(model.forward, backend="liger", dynamic=True, options={"compiler": "aot_eager"})
    with liger_compile.report.collect() as report:
        actual = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)
    assert report.counts()["rms_norm"] > 0 and report.counts()["rope"] > 0, str(report)
