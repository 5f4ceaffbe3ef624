"""Rewritten ops whose output backward can make again from what it keeps anyway (a norm's output from its input
and statistics, a gated activation's product from its two inputs) are tagged for AOTAutograd's partitioner to
recompute, not save: on the GPU each such output is an activation less per layer. On the CPU the ops trace into
their PyTorch reference, so only the tags can be checked here."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

from tests.conftest import DEVICE
from tests.helpers import rewritten_graph


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


CASES = {
    "rms_norm": (lambda: nn.Sequential(nn.RMSNorm(64), nn.Linear(64, 64)), torch.ops.liger.rms_norm.default),
    "layer_norm": (lambda: nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)), torch.ops.liger.layer_norm.default),
    "glu": (GatedMLP, torch.ops.liger.gated_activation.default),
}


@pytest.mark.parametrize("family", CASES)
def test_outputs_backward_can_make_again_are_tagged_for_recomputation(family):
    make, op = CASES[family]
    graph = rewritten_graph(make().to(DEVICE), torch.randn(2, 3, 64, device=DEVICE), families=[family])
    rewritten = [node for node in graph.nodes if node.target is op]
    assert len(rewritten) == 1
    assert rewritten[0].meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE
    assert not [node for node in graph.nodes if node.op == "call_function" and node.target is not op
                and node.meta.get("recompute")]  # the linear layers' outputs stay saved
