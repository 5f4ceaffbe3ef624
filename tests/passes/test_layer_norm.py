"""The LayerNorm rewrite: every spelling is rewritten exactly once and exactly; near-misses are left alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE
from tests.helpers import check_rewrite as check_family_rewrite

EPS = 1e-5
HIDDEN = 48


class Spelled(nn.Module):
    """A LayerNorm (or near-miss) written as a function of (x, weight, bias)."""

    def __init__(self, fn, weight_shape=(HIDDEN,)):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(weight_shape))
        self.bias = nn.Parameter(torch.randn(weight_shape))

    def forward(self, x):
        return self.fn(x, self.weight, self.bias)


def centered_variance(x):
    mean = x.mean(-1, keepdim=True)
    return x - mean, (x - mean).pow(2).mean(-1, keepdim=True)


def hf_norm(name):
    def build():
        if name == "cohere":
            from transformers.models.cohere.modeling_cohere import CohereLayerNorm as Norm
        else:
            from transformers.models.deberta.modeling_deberta import DebertaLayerNorm as Norm
        norm = Norm(HIDDEN, eps=EPS)
        for parameter in norm.parameters():
            nn.init.normal_(parameter)
        return norm

    return build


def xlstm_style(x, w, b):
    """xLSTM's multi-head norm: var(unbiased=False) next to an explicit centering, in fp32, cast back."""
    x32 = x.float()
    y = (x32 - x32.mean(dim=-1, keepdim=True)) * torch.rsqrt(x32.var(dim=-1, keepdim=True, unbiased=False) + EPS)
    return y.to(x.dtype) * w + b


SPELLINGS = {
    "nn.LayerNorm": lambda: nn.LayerNorm(HIDDEN, eps=EPS),
    "nn.LayerNorm_no_affine": lambda: nn.LayerNorm(HIDDEN, elementwise_affine=False),
    "nn.LayerNorm_no_bias": lambda: nn.LayerNorm(HIDDEN, bias=False),
    "F.layer_norm": lambda: Spelled(lambda x, w, b: F.layer_norm(x, (HIDDEN,), w, b, EPS)),
    "torch.layer_norm_default_eps": lambda: Spelled(lambda x, w, b: torch.layer_norm(x, [HIDDEN], w, b)),
    "hf_cohere_fp32_upcast": hf_norm("cohere"),
    "hf_deberta_divide_by_sqrt": hf_norm("deberta"),
    "var_unbiased_false": lambda: Spelled(
        lambda x, w, b: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
        * w + b),
    "var_correction_0_bias_first": lambda: Spelled(
        lambda x, w, b: b + w * ((x - x.mean(-1, keepdim=True))
                                 / torch.sqrt(torch.var(x, -1, correction=0, keepdim=True) + EPS))),
    "square_and_one_over_sqrt": lambda: Spelled(
        lambda x, w, b: (x - x.mean(-1, keepdim=True))
        * (1 / torch.sqrt(torch.square(x - x.mean(-1, keepdim=True)).mean(-1, keepdim=True) + EPS))),
    "one_centering_reused": lambda: Spelled(
        lambda x, w, b: (lambda c, v: c * torch.rsqrt(v + EPS) * w + b)(*centered_variance(x))),
}


def check_rewrite(module, x, expected_rewrites, expected_variant=None):
    report = check_family_rewrite(module, x, "layer_norm", expected_rewrites)
    if expected_variant:
        assert {r.variant for r in report.rewrites} == {expected_variant}, str(report)
    assert report.counts()["rms_norm"] == 0, str(report)
    return report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_rewritten_once_fp32(spelling):
    torch.manual_seed(0)
    report = check_rewrite(SPELLINGS[spelling](), torch.randn(2, 5, HIDDEN) * 2 + 3, 1)
    assert report.near_misses == []


@pytest.mark.parametrize("spelling,variant", [
    ("nn.LayerNorm", "F.layer_norm"),
    ("hf_cohere_fp32_upcast", "arithmetic * weight (cast back)"),
])
def test_bf16_spellings_that_compute_in_fp32(spelling, variant):
    torch.manual_seed(0)
    module = SPELLINGS[spelling]().to(torch.bfloat16)
    check_rewrite(module, (torch.randn(2, 5, HIDDEN) * 2).to(torch.bfloat16), 1, variant)


@pytest.mark.skipif(DEVICE == "cuda", reason="torch's CUDA layer_norm refuses mixed dtypes: no eager reference")
def test_fp32_affine_on_bf16_activations():
    torch.manual_seed(0)
    module = nn.LayerNorm(HIDDEN)  # fp32 parameters, as with fp32 master weights
    nn.init.normal_(module.weight)
    check_rewrite(module, torch.randn(3, HIDDEN).to(torch.bfloat16), 1, "F.layer_norm")


def test_upcast_without_a_cast_back_returns_fp32():
    def normalized_upcast(x, w, b):
        x32 = x.float()
        return (x32 - x32.mean(-1, keepdim=True)) * torch.rsqrt(x32.var(-1, keepdim=True, unbiased=False) + EPS) * w

    torch.manual_seed(0)
    check_rewrite(Spelled(normalized_upcast), torch.randn(3, HIDDEN).to(torch.bfloat16), 1, "arithmetic * weight")


def test_deberta_casts_back_before_its_bf16_affine_which_stays_outside():
    torch.manual_seed(0)
    module = SPELLINGS["hf_deberta_divide_by_sqrt"]().to(torch.bfloat16)
    check_rewrite(module, (torch.randn(2, 5, HIDDEN) * 2).to(torch.bfloat16), 1, "arithmetic (cast back)")


def test_xlstm_style_upcast_and_cast_back():
    torch.manual_seed(0)
    module = Spelled(xlstm_style).to(torch.bfloat16)
    check_rewrite(module, (torch.randn(3, HIDDEN) * 2).to(torch.bfloat16), 1, "arithmetic (cast back)")


NEAR_MISSES = {
    "normalized_over_two_dims": (lambda x, w, b: F.layer_norm(x, x.shape[-2:]), "not the last dim only"),
    "unbiased_variance": (lambda x, w, b: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + EPS),
                          "unbiased"),
    "eps_outside_sqrt": (lambda x, w, b: (lambda c, v: c / (torch.sqrt(v) + EPS))(*centered_variance(x)),
                         "outside the square root"),
    "variance_over_first_dim": (lambda x, w, b: (x - x.mean(-1, keepdim=True))
                                * torch.rsqrt((x - x.mean(-1, keepdim=True)).pow(2).mean(0, keepdim=True) + EPS),
                                "not over the last dim"),
    "mean_over_two_dims": (lambda x, w, b: (lambda c: c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + EPS))(
        x - x.mean((-2, -1), keepdim=True)), "not over the last dim"),
    "normalises_another_tensor": (lambda x, w, b: (lambda c, v: (x - 1) * torch.rsqrt(v + EPS))(*centered_variance(x)),
                                  "not the centered input"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    fn, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    report = check_family_rewrite(Spelled(fn), torch.randn(2, 5, HIDDEN), "layer_norm", 0)
    misses = [m for m in report.near_misses if m.family == "layer_norm"]
    assert len(misses) == 1 and reason in misses[0].reason, str(report)


def test_bf16_arithmetic_is_a_near_miss():
    module = Spelled(lambda x, w, b: (lambda c, v: c * torch.rsqrt(v + EPS))(*centered_variance(x)))
    report = check_family_rewrite(module.to(torch.bfloat16), torch.randn(3, HIDDEN).to(torch.bfloat16),
                                  "layer_norm", 0)
    assert "rounding every step" in report.near_misses[0].reason, str(report)


def test_autocast_layer_norm_is_rewritten_only_where_it_keeps_the_input_dtype():
    """CUDA autocast runs layer_norm in fp32 on a bf16 input (a near-miss); CPU autocast keeps bf16."""
    def under_autocast(x, w, b):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return F.layer_norm(x @ torch.eye(HIDDEN, device=x.device, dtype=x.dtype), (HIDDEN,), w, b, EPS)

    x = torch.randn(3, HIDDEN, device=DEVICE).to(torch.bfloat16)
    upcast = under_autocast(x, None, None).dtype == torch.float32
    report = check_family_rewrite(Spelled(under_autocast), x, "layer_norm", 0 if upcast else 1)
    assert upcast == bool(report.near_misses) and (not upcast or "autocast" in report.near_misses[0].reason)


def test_bias_that_does_not_broadcast_over_the_last_dim_is_a_near_miss():
    torch.manual_seed(0)
    module = Spelled(lambda x, w, b: F.layer_norm(x, (HIDDEN,), None, b[0], EPS), weight_shape=(1, HIDDEN))
    report = check_family_rewrite(module, torch.randn(2, 5, HIDDEN), "layer_norm", 1)
    assert report.near_misses == []


def test_a_centered_value_without_a_variance_is_not_reported():
    report = check_family_rewrite(Spelled(lambda x, w, b: (x - x.mean(-1, keepdim=True)) * w),
                                  torch.randn(4, HIDDEN), "layer_norm", 0)
    assert report.near_misses == []
