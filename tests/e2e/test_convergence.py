"""Training with the liger backend follows eager training: 4-layer models, 32 AdamW steps, the same init.

fp32 runs wherever the suite runs (CPU in CI); the bf16 variant needs a GPU and carries the `gpu` marker, which
the device run selects with ``-m gpu``.
"""

import copy

import pytest
import torch

from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_relative_error
from tests.models.architectures import VOCAB, build

MODELS = ["llama", "qwen3", "gemma2", "mixtral", "phi3", "gpt_neox"]
STEPS, BATCH, SEQ, TOP_K = 32, 4, 32, 5
# (per-step loss rtol, final weights relative error, held-out top-k log-prob atol). AdamW turns the rounding
# noise of gradients that are zero in exact arithmetic (GPT-NeoX's key bias: softmax ignores a per-query
# constant) into lr-sized steps, which any change in rounding order (the cross-entropy's, in fp32) makes differ:
# 6e-4 of that bias after 32 steps, every other parameter within 1e-5. In bf16 the same holds for tiny
# gradients, so final weights drift apart by a few percent even when every op rounds as eager does.
TOLERANCES = {torch.float32: (1e-4, 1e-3, 1e-3), torch.bfloat16: (2e-2, 5e-2, 5e-2)}


def train(model, forward, dtype):
    """Per-step losses, then the log-probs of a held-out batch after training."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    # A few batches seen over and over: memorisable, so the loss must fall (uniform random tokens would
    # leave nothing to learn below ln(VOCAB)).
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(DEVICE) for _ in range(2)]
    losses = []
    for step in range(STEPS):
        ids = batches[step % len(batches)]
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    held = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        logprobs = model(input_ids=held).logits.float().log_softmax(-1)
    return torch.stack(losses), logprobs


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MODELS)
def test_training_follows_eager(model_type, dtype):
    if dtype == torch.bfloat16 and DEVICE != "cuda":
        pytest.skip("bf16 convergence runs on a GPU")
    model = build(model_type, num_hidden_layers=4).to(DEVICE)
    reference = copy.deepcopy(model)
    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(model, backend="liger", options={"compiler": compiler})
    with collect() as report:
        losses, logprobs = train(model, lambda i: compiled(input_ids=i, labels=i), dtype)
    expected_losses, expected_logprobs = train(reference, lambda i: reference(input_ids=i, labels=i), dtype)

    loss_rtol, weight_tolerance, logprob_atol = TOLERANCES[dtype]
    assert not report.failures
    assert sum(report.counts().values()) > 0 or model_type == "gpt_neox"  # GPT-NeoX has no RMSNorm
    torch.testing.assert_close(losses, expected_losses, rtol=loss_rtol, atol=0)
    assert losses[-1] < losses[0]  # it did learn something
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        assert_relative_error(param.detach(), ref_param.detach(), weight_tolerance)
    # eager's top-k tokens, read in both: near-ties make the order itself noisy in bf16
    expected_top, top_tokens = expected_logprobs.topk(TOP_K, dim=-1)
    torch.testing.assert_close(logprobs.gather(-1, top_tokens), expected_top, rtol=0, atol=logprob_atol)
