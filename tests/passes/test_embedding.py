"""The embedding rewrite: each spelling rewritten once and exactly; lookups with options that
change the computation are left alone and reported."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE
from tests.helpers import compile_and_report

VOCAB, DIM = 30, 16


class Lookup(nn.Module):
    def __init__(self, lookup, **embedding_options):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, **embedding_options)
        self.lookup = lookup

    def forward(self, ids):
        return self.lookup(self.embed, ids) * 2.0


SPELLINGS = {
    "nn.Embedding": (lambda e, i: e(i), {}, "F.embedding"),
    "nn.Embedding padding_idx": (lambda e, i: e(i), {"padding_idx": 3}, "F.embedding padding_idx"),
    "nn.Embedding negative padding_idx": (lambda e, i: e(i), {"padding_idx": -1}, "F.embedding padding_idx"),
    "F.embedding": (lambda e, i: F.embedding(i, e.weight), {}, "F.embedding"),
    "F.embedding keyword padding_idx": (lambda e, i: F.embedding(i, e.weight, padding_idx=-2), {},
                                        "F.embedding padding_idx"),
    "torch.embedding": (lambda e, i: torch.embedding(e.weight, i), {}, "torch.embedding"),
    "torch.embedding padding_idx": (lambda e, i: torch.embedding(e.weight, i, 4), {}, "torch.embedding padding_idx"),
}

NEAR_MISSES = {
    "max_norm": (lambda e, i: e(i), {"max_norm": 1.0}, "max_norm=1.0"),
    "scale_grad_by_freq": (lambda e, i: e(i), {"scale_grad_by_freq": True}, "scale_grad_by_freq=True"),
    "torch.embedding scale_grad_by_freq": (lambda e, i: torch.embedding(e.weight, i, -1, True), {},
                                           "scale_grad_by_freq=True"),
    "float64 weight": (lambda e, i: F.embedding(i, e.weight.double()), {}, "torch.float64"),
}


def ids():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    ids[0, :4] = 3  # the padding row, repeated
    return ids.to(DEVICE)


def compile_and_compare(module, **options):
    module = module.to(DEVICE)
    reference = copy.deepcopy(module)
    expected = reference(ids())
    cotangent = torch.randn_like(expected)
    expected.backward(cotangent)
    actual, report = compile_and_report(module, ids(), **options)
    actual.backward(cotangent)
    assert not report.failures, str(report)
    assert torch.equal(actual, expected)
    torch.testing.assert_close(module.embed.weight.grad, reference.embed.weight.grad)
    return report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_rewritten_once(spelling):
    lookup, options, variant = SPELLINGS[spelling]
    torch.manual_seed(0)
    report = compile_and_compare(Lookup(lookup, **options), embedding=True)
    assert report.counts()["embedding"] == 1, str(report)
    assert [r.variant for r in report.rewrites] == [variant]
    assert report.near_misses == []


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    lookup, options, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    module = Lookup(lookup, **options)
    if "max_norm" in options:  # renormalises rows of the weight in place: compare from equal starting weights
        _, report = compile_and_report(module.to(DEVICE), ids(), embedding=True)
    else:
        report = compile_and_compare(module, embedding=True)
    assert report.counts()["embedding"] == 0
    assert [m.family for m in report.near_misses] == ["embedding"]
    assert reason in report.near_misses[0].reason


def test_on_by_default_and_switchable():
    torch.manual_seed(0)
    assert compile_and_compare(Lookup(SPELLINGS["nn.Embedding"][0])).counts()["embedding"] == 1
    report = compile_and_compare(Lookup(SPELLINGS["nn.Embedding"][0]), embedding=False)
    assert report.counts()["embedding"] == 0 and report.near_misses == []
