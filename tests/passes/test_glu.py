"""The gated-activation rewrite: every spelling is rewritten exactly once and exactly; near-misses are left
alone and reported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from tests.conftest import DEVICE
from tests.helpers import check_rewrite as check_family_rewrite, compile_and_report

HIDDEN, INTERMEDIATE = 32, 48


class GatedMLP(nn.Module):
    """down(combine(gate_proj(x), up_proj(x))), or with one fused gate_up projection split by `combine`."""

    def __init__(self, combine, fused=False, down_bias=False):
        super().__init__()
        self.combine = combine
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(HIDDEN, 2 * INTERMEDIATE, bias=False)
        else:
            self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
            self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=down_bias)

    def forward(self, x):
        if self.fused:
            return self.down_proj(self.combine(self.gate_up_proj(x)))
        return self.down_proj(self.combine(self.gate_proj(x), self.up_proj(x)))


def gelu_new(a):
    # HF's NewGELUActivation, written out as in transformers.activations
    return 0.5 * a * (1.0 + torch.tanh(0.7978845608028654 * (a + 0.044715 * torch.pow(a, 3.0))))


SPELLINGS = {
    "F.silu": (lambda g, u: F.silu(g) * u, "swiglu"),
    "up_times_silu": (lambda g, u: u * F.silu(g), "swiglu"),
    "torch.mul": (lambda g, u: torch.mul(F.silu(g), u), "swiglu"),
    "method_mul": (lambda g, u: F.silu(g).mul(u), "swiglu"),
    "nn.SiLU": (lambda g, u: nn.SiLU()(g) * u, "swiglu"),
    "hf_silu": (lambda g, u: ACT2FN["silu"](g) * u, "swiglu"),
    "hf_swish": (lambda g, u: ACT2FN["swish"](g) * u, "swiglu"),
    "F.gelu_tanh": (lambda g, u: F.gelu(g, approximate="tanh") * u, "geglu_tanh"),
    "nn.GELU_tanh": (lambda g, u: nn.GELU(approximate="tanh")(g) * u, "geglu_tanh"),
    "hf_gelu_pytorch_tanh": (lambda g, u: ACT2FN["gelu_pytorch_tanh"](g) * u, "geglu_tanh"),
    "hf_gelu_new_arithmetic": (lambda g, u: ACT2FN["gelu_new"](g) * u, "geglu_tanh (gelu_new)"),
    "gelu_new_written_out": (lambda g, u: u * gelu_new(g), "geglu_tanh (gelu_new)"),
    "exact_gelu": (lambda g, u: F.gelu(g) * u, "geglu"),
    "hf_gelu": (lambda g, u: ACT2FN["gelu"](g) * u, "geglu"),
}

PACKED_SPELLINGS = {
    "chunk_method": (lambda t: (lambda g, u: u * F.silu(g))(*t.chunk(2, dim=-1)), "swiglu packed"),
    "torch.chunk": (lambda t: (lambda g, u: F.gelu(g, approximate="tanh") * u)(*torch.chunk(t, 2, -1)),
                    "geglu_tanh packed"),
    "split_half": (lambda t: (lambda g, u: F.silu(g) * u)(*t.split(INTERMEDIATE, dim=-1)), "swiglu packed"),
    "split_sizes": (lambda t: (lambda g, u: F.silu(g) * u)(*torch.split(t, [INTERMEDIATE, INTERMEDIATE], -1)),
                    "swiglu packed"),
    # the activation on the second half: the op takes the two halves as views instead
    "second_half_gated": (lambda t: (lambda u, g: F.silu(g) * u)(*t.chunk(2, -1)), "swiglu + down projection"),
}


def check_rewrite(module, x, expected_rewrites):
    return check_family_rewrite(module, x, "glu", expected_rewrites)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_rewritten_once(spelling):
    combine, variant = SPELLINGS[spelling]
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(combine), torch.randn(2, 5, HIDDEN), 1)
    assert [r.variant for r in report.rewrites] == [variant + " + down projection"]
    assert report.near_misses == []


@pytest.mark.parametrize("spelling", PACKED_SPELLINGS)
def test_fused_gate_up_is_read_whole(spelling):
    combine, variant = PACKED_SPELLINGS[spelling]
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(combine, fused=True), torch.randn(2, 5, HIDDEN), 1)
    assert [r.variant for r in report.rewrites] == [variant]


@pytest.mark.parametrize("spelling", ["F.silu", "hf_gelu_pytorch_tanh", "exact_gelu"])
def test_bf16_matches_eager_rounding(spelling):
    combine, _ = SPELLINGS[spelling]
    torch.manual_seed(0)
    check_rewrite(GatedMLP(combine).to(torch.bfloat16), torch.randn(2, 5, HIDDEN).to(torch.bfloat16), 1)


def test_two_mlps_and_a_product_of_products():
    """Several matches in one graph, one of them consuming another's output."""
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(lambda g, u: F.silu(g) * (F.gelu(u) * u)), torch.randn(3, HIDDEN), 2)
    assert sorted(r.variant for r in report.rewrites) == ["geglu", "swiglu + down projection"]


class ProductAlsoReturned(GatedMLP):
    def forward(self, x):
        product = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(product) + product.sum(-1, keepdim=True)


@pytest.mark.parametrize("case", ["product_used_twice", "down_projection_bias", "autocast_bf16"])
def test_activation_alone_where_the_down_projection_cannot_join(case):
    """The product read elsewhere, a bias, or a linear computing in another dtype (autocast): only the
    activation is rewritten, and the linear stays as it was."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, HIDDEN)
    if case == "product_used_twice":
        report = check_rewrite(ProductAlsoReturned(None), x, 1)
    elif case == "down_projection_bias":
        report = check_rewrite(GatedMLP(lambda g, u: F.silu(g) * u, down_bias=True), x, 1)
    else:
        class Autocast(GatedMLP):
            def forward(self, x):
                product = F.silu(self.gate_proj(x)) * self.up_proj(x)  # fp32
                with torch.autocast(DEVICE, dtype=torch.bfloat16):  # casts the product for the linear
                    return self.down_proj(product).float()
        _, report = compile_and_report(Autocast(None).to(DEVICE), x.to(DEVICE))
    assert [r.variant for r in report.rewrites] == ["swiglu"], str(report)


def test_frozen_down_projection_still_joins():
    """LoRA-style frozen weights: the down projection's weight needs no gradient, the inputs do."""
    torch.manual_seed(0)
    module = GatedMLP(lambda g, u: F.silu(g) * u)
    module.down_proj.weight.requires_grad_(False)
    report = check_rewrite(module, torch.randn(2, 5, HIDDEN), 1)
    assert [r.variant for r in report.rewrites] == ["swiglu + down projection"]


NEAR_MISSES = {
    "sigmoid_gate": (lambda g, u: torch.sigmoid(g) * u, "sigmoid-gated"),
    "broadcast_operand": (lambda g, u: F.silu(g) * u[..., :1], "broadcast"),
    "activation_used_twice": (lambda g, u: (lambda s: s * u + s.mean())(F.silu(g)), "also used elsewhere"),
    "silu_inplace": (lambda g, u: F.silu(g.clone(), inplace=True) * u, "inplace=True"),
    "upcast_product": (lambda g, u: F.silu(g) * u.double(), "dtypes differ"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    combine, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(lambda g, u: combine(g, u).to(g.dtype)), torch.randn(2, 5, HIDDEN), 0)
    assert [m.family for m in report.near_misses] == ["glu"], str(report)
    assert reason in report.near_misses[0].reason


def test_gelu_new_arithmetic_in_bf16_is_a_near_miss():
    """Eager rounds each of its eight steps to bf16; the kernel rounds once: not the same computation."""
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(lambda g, u: gelu_new(g) * u).to(torch.bfloat16),
                           torch.randn(2, 5, HIDDEN).to(torch.bfloat16), 0)
    assert "rounds after every step" in report.near_misses[0].reason


@pytest.mark.parametrize("combine", [
    lambda g, u: F.silu(g) * 2.0,  # a scalar factor
    lambda g, u: F.relu(g) * u,  # an activation without a kernel
    lambda g, u: 0.5 * g * (1.0 + torch.tanh(0.79 * (g + 0.044715 * g**3))) * u,  # not gelu_new's constant
], ids=["scalar_factor", "relu", "wrong_constant"])
def test_other_products_are_not_matched(combine):
    torch.manual_seed(0)
    report = check_rewrite(GatedMLP(combine), torch.randn(2, 5, HIDDEN), 0)
    assert report.near_misses == []


def test_switched_off_by_option():
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["F.silu"][0]).to(DEVICE)
    _, report = compile_and_report(module, torch.randn(2, HIDDEN, device=DEVICE), glu=False)
    assert report.counts().get("glu", 0) == 0
