"""Inductor's modes on a GPU: CUDA graphs (mode="reduce-overhead": no host syncs, no data-dependent host logic,
static allocation in the ops) and max-autotune train as eager does, with every rewrite in place.
The model is the hand-written Llama with fused gate_up, compiled whole (fullgraph): RMSNorm, RoPE, SwiGLU and
the fused linear cross-entropy all run inside the captured graphs.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, variants
from tests.models.custom_models import VOCAB, FusedLlama
from tests.models.test_custom_models import loss_fn

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and autotuning need a GPU")


class Loss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return loss_fn(self.model, ids)


def train(step, parameters, steps=3):
    optimizer = torch.optim.SGD(parameters, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 16), generator=generator).to(DEVICE)
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: last step's graph outputs may be reused
        loss = step(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()  # to None: zeroing in place would write into a graph's outputs before the next replay
        losses.append(loss.detach().clone())
    return torch.stack(losses)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_inductor_modes_train_as_eager(mode):
    torch.manual_seed(0)
    model = Loss(FusedLlama()).to(DEVICE)
    reference = copy.deepcopy(model)
    counters.clear()
    with collect() as report:
        losses = train(liger_compile.optimize(model, mode=mode, fullgraph=True), model.parameters())
    expected = train(reference, reference.parameters())
    assert_close(losses, expected, rtol=1e-4, atol=1e-4)
    counts = report.counts()
    assert (counts["rms_norm"], counts["glu"], counts["rope"], counts["cross_entropy"]) == (5, 2, 2, 1), str(report)
    assert "fused linear" in variants(report, "cross_entropy")[-1], str(report)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
