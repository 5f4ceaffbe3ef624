"""The residual add + norm rewrite: a pre-norm block's sum and its next norm become one fused op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import check_rewrite

HIDDEN = 48


class PreNormBlocks(nn.Module):
    """Two pre-norm blocks: h = x + f(norm(x)); the sum feeds the next norm and the residual stream."""

    def __init__(self, norm: str):
        super().__init__()
        make = {"rms_norm": lambda: nn.RMSNorm(HIDDEN, eps=1e-6), "layer_norm": lambda: nn.LayerNorm(HIDDEN)}[norm]
        self.norms = nn.ModuleList(make() for _ in range(3))
        self.projections = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(2))

    def forward(self, x):
        for norm, projection in zip(self.norms, self.projections):
            x = x + projection(norm(x))
        return self.norms[-1](x)


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_sum_feeding_a_norm_is_fused(norm, dtype):
    torch.manual_seed(0)
    # the first norm reads the block's input (no sum), the other two read x + projection(...)
    report = check_rewrite(PreNormBlocks(norm).to(dtype), torch.randn(2, 5, HIDDEN).to(dtype), "residual_norm", 2,
                           residual_norm=True)
    assert report.counts()[norm] == 3
    assert {r.variant for r in report.rewrites if r.family == "residual_norm"} == {f"add + {norm}"}


def test_off_by_default_until_it_is_shown_to_help_end_to_end():
    torch.manual_seed(0)
    report = check_rewrite(PreNormBlocks("rms_norm"), torch.randn(2, 5, HIDDEN), "residual_norm", 0)
    assert report.counts()["rms_norm"] == 3


class Summed(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(HIDDEN))

    def forward(self, x):
        return self.fn(x, self.weight)


@pytest.mark.parametrize("fn,reason", [
    (lambda x, w: F.rms_norm(x + w, (HIDDEN,), w), "broadcasts"),
    (lambda x, w: F.rms_norm(x.to(torch.bfloat16) + x, (HIDDEN,), w), "promotes"),
])
def test_sums_that_broadcast_or_promote_are_near_misses(fn, reason):
    torch.manual_seed(0)
    report = check_rewrite(Summed(fn), torch.randn(3, HIDDEN), "residual_norm", 0, residual_norm=True)
    assert [m.family for m in report.near_misses] == ["residual_norm"] and reason in report.near_misses[0].reason


def test_a_scalar_added_is_not_a_residual():
    report = check_rewrite(Summed(lambda x, w: F.rms_norm(x + 1.0, (HIDDEN,), w)), torch.randn(3, HIDDEN),
                           "residual_norm", 0, residual_norm=True)
    assert report.near_misses == []


def test_weight_computed_after_the_sum():
    """The fused op goes after the weight's cast, which the code writes between the sum and the norm."""
    torch.manual_seed(0)
    module = Summed(lambda x, w: (lambda h: F.rms_norm(h, (HIDDEN,), w * 2.0) + h)(x + x.flip(0)))
    check_rewrite(module, torch.randn(3, HIDDEN), "residual_norm", 1, residual_norm=True)
