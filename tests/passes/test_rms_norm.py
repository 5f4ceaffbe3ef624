"""The RMSNorm rewrite: every spelling is rewritten exactly once and exactly; near-misses are left alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import DEVICE
from tests.helpers import assert_close, check_rewrite as check_family_rewrite

EPS = 1e-6
HIDDEN = 48


def rsqrt_mean_sq(x):
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


class MetaReferenceRMSNorm(nn.Module):
    """As in Meta's Llama reference code: normalise in fp32, `.type_as(x)`, then scale."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


class Qwen3QKNorm(nn.Module):
    """A projection viewed as (B, T, heads, head_dim), normalised over head_dim as Qwen3 does for q and k."""

    def __init__(self):
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norm = Qwen3RMSNorm(HIDDEN // 4, eps=EPS)

    def forward(self, x):
        return self.norm(self.proj(x).view(*x.shape[:-1], 4, HIDDEN // 4)).transpose(1, 2)


def hf_norm(name):
    def build():
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}[name](HIDDEN, eps=EPS)
        nn.init.normal_(norm.weight)
        return norm

    return build


class Spelled(nn.Module):
    """An RMSNorm (or near-miss) written as a function of (x, weight)."""

    def __init__(self, fn, weight_shape=(HIDDEN,)):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(weight_shape))

    def forward(self, x):
        return self.fn(x, self.weight)


SPELLINGS = {
    "hf_llama": hf_norm("llama"),
    "hf_gemma_one_plus_weight": hf_norm("gemma"),
    "qwen3_qk_norm": Qwen3QKNorm,
    "meta_type_as": lambda: MetaReferenceRMSNorm(HIDDEN),
    "nn.RMSNorm": lambda: nn.RMSNorm(HIDDEN, eps=EPS),
    "nn.RMSNorm_default_eps": lambda: nn.RMSNorm(HIDDEN),
    "F.rms_norm": lambda: Spelled(lambda x, w: F.rms_norm(x, (HIDDEN,), w, EPS)),
    "F.rms_norm_no_weight": lambda: Spelled(lambda x, w: F.rms_norm(x, (HIDDEN,), eps=EPS)),
    "x_times_x": lambda: Spelled(lambda x, w: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w),
    "torch.square": lambda: Spelled(lambda x, w: w * (x * torch.rsqrt(torch.square(x).mean(-1, keepdim=True) + EPS))),
    "one_over_sqrt": lambda: Spelled(
        lambda x, w: x * (1 / torch.sqrt(torch.mean(x.pow(2), dim=-1, keepdim=True) + EPS)) * w),
    "reciprocal_sqrt": lambda: Spelled(
        lambda x, w: x * torch.reciprocal(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) * w),
    "pow_minus_half": lambda: Spelled(lambda x, w: x * (x.pow(2).mean(-1, keepdim=True) + EPS).pow(-0.5) * w),
    "divide_by_sqrt": lambda: Spelled(lambda x, w: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w),
    "mean_of_dim_list": lambda: Spelled(lambda x, w: x * torch.rsqrt((x**2).mean([-1], keepdim=True) + EPS) * w),
    "method_chain": lambda: Spelled(lambda x, w: x.mul(x.pow(2).mean(dim=-1, keepdim=True).add(EPS).rsqrt()).mul(w)),
    "no_weight": lambda: Spelled(lambda x, w: x * rsqrt_mean_sq(x)),
    "cpmant_uncast_input": lambda: Spelled(  # x * rsqrt(mean(x.float()**2)): the product widens x exactly
        lambda x, w: (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w),
    "offset_weight_in_fp32": lambda: Spelled(
        lambda x, w: (x.float() * rsqrt_mean_sq(x.float()) * (1.0 + w.float())).to(x.dtype)),
}


def check_rewrite(module, x, expected_rewrites, expected_variant=None):
    report = check_family_rewrite(module, x, "rms_norm", expected_rewrites)
    if expected_variant:
        assert {r.variant for r in report.rewrites} == {expected_variant}
    return report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_rewritten_once_fp32(spelling):
    torch.manual_seed(0)
    report = check_rewrite(SPELLINGS[spelling](), torch.randn(2, 5, HIDDEN) * 2, 1)
    assert report.near_misses == []


@pytest.mark.parametrize("spelling,variant", [
    ("hf_llama", "llama"),
    ("meta_type_as", "llama"),
    ("qwen3_qk_norm", "llama"),
    ("hf_gemma_one_plus_weight", "gemma"),
    ("offset_weight_in_fp32", "gemma"),
    ("cpmant_uncast_input", "llama"),
    ("nn.RMSNorm", "torch.rms_norm"),
    ("x_times_x", "none"),
])
def test_bf16_spellings_pick_the_casting_mode_of_the_code(spelling, variant):
    torch.manual_seed(0)
    module = SPELLINGS[spelling]().to(torch.bfloat16)
    check_rewrite(module, (torch.randn(2, 5, HIDDEN) * 2).to(torch.bfloat16), 1, variant)


def test_fp32_weight_on_bf16_activations_keeps_eager_promotion():
    torch.manual_seed(0)
    module = hf_norm("llama")()  # fp32 weight, as under mixed precision with fp32 master weights
    x = (torch.randn(3, HIDDEN) * 2).to(torch.bfloat16)
    check_rewrite(module, x, 1, "llama")


NEAR_MISSES = {
    "mean_over_first_dim": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + EPS) * w,
                            "not over the last dim"),
    "mean_over_two_dims": (lambda x, w: x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + EPS) * w,
                           "not over the last dim"),
    "mean_without_keepdim": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1) + EPS).unsqueeze(-1) * w,
                             "keepdim"),
    "no_eps": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w, "no eps"),
    "eps_outside_sqrt": (lambda x, w: x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + EPS) * w,
                         "outside the square root"),
    "normalises_another_tensor": (lambda x, w: (x + 1) * rsqrt_mean_sq(x) * w, "not the one whose mean square"),
    "statistic_in_input_dtype_normalises_upcast": (lambda x, w: x.float() * rsqrt_mean_sq(x) * w,
                                                   "not the one whose mean square"),
    "mean_with_dtype": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True, dtype=torch.float32) + EPS),
                        "dtype argument"),
    "F.rms_norm_over_two_dims": (lambda x, w: F.rms_norm(x, x.shape[-2:], None, EPS), "not the last dim"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    fn, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    report = check_rewrite(Spelled(fn), torch.randn(2, 5, HIDDEN), 0)
    assert [m.family for m in report.near_misses] == ["rms_norm"], str(report)
    assert reason in report.near_misses[0].reason


def test_weight_that_does_not_broadcast_over_the_last_dim_is_a_near_miss():
    torch.manual_seed(0)
    module = Spelled(lambda x, w: x * rsqrt_mean_sq(x) * w, weight_shape=(5, 1))
    report = check_rewrite(module, torch.randn(2, 5, HIDDEN), 0)
    assert "not a weight over the last dim" in report.near_misses[0].reason


def test_eps_held_in_a_tensor_is_a_near_miss():
    class TensorEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("eps", torch.tensor(EPS))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    report = check_rewrite(TensorEps(), torch.randn(4, HIDDEN), 0)
    assert "neither a constant nor a float" in report.near_misses[0].reason


def test_unrelated_mean_of_squares_is_not_reported():
    report = check_rewrite(Spelled(lambda x, w: ((x - w) ** 2).mean() * x), torch.randn(4, HIDDEN), 0)
    assert report.near_misses == []


def test_scalar_multiply_after_the_norm_stays_outside_the_match():
    report = check_rewrite(Spelled(lambda x, w: x * rsqrt_mean_sq(x) * 0.5 * w), torch.randn(4, HIDDEN), 1)
    assert report.near_misses == []


def test_two_norms_sharing_an_upcast_are_both_rewritten():
    def two_norms(x, w):
        x32 = x.float()
        return (x32 * rsqrt_mean_sq(x32)).to(x.dtype) * w + (x32 * rsqrt_mean_sq(x32)).to(x.dtype)

    check_rewrite(Spelled(two_norms).to(torch.bfloat16), torch.randn(4, HIDDEN).to(torch.bfloat16), 2)


def test_rewrite_inside_activation_checkpoint():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(HIDDEN, eps=EPS)
            self.proj = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            return checkpoint(lambda h: self.proj(self.norm(h)), x, use_reentrant=False)

    torch.manual_seed(0)
    report = check_rewrite(Checkpointed(), torch.randn(3, 4, HIDDEN), 1)
    assert report.near_misses == []


@pytest.mark.parametrize("dynamic", [None, True], ids=["recompiled", "dynamic=True"])
def test_eps_made_dynamic_is_passed_to_the_op(dynamic):
    """Dynamo makes a float dynamic after a recompile for another value, or from the start under dynamic=True: the
    op takes the graph's float (Dynamo then specializes the graph on it, as a custom op's float cannot stay
    symbolic: a new eps compiles a new graph, which a training run never sees)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from liger_compile.report import collect

    def apply(norm, x):
        return norm(x)

    compiled = torch.compile(apply, backend="liger", dynamic=dynamic, options={"compiler": "aot_eager"})
    x = torch.randn(3, HIDDEN, device=DEVICE) * 1e-3  # small enough for eps to matter
    with collect() as report:
        for eps in (1e-6, 1e-5, 1e-4):
            norm = LlamaRMSNorm(HIDDEN, eps=eps).to(DEVICE)
            assert_close(compiled(norm, x), norm(x))
    assert report.graphs and all(len(graph.rewrites) == 1 for graph in report.graphs)
    assert report.near_misses == []


def test_norm_of_a_norm_output_is_rewritten_twice():
    """The second match's input is the node the first rewrite replaces (as in nanochat's double norm)."""
    module = Spelled(lambda x, w: F.rms_norm(F.rms_norm(x, (HIDDEN,), eps=EPS), (HIDDEN,), w, EPS))
    check_rewrite(module, torch.randn(2, 5, HIDDEN), 2)

    chained = Spelled(lambda x, w: (lambda h: h * rsqrt_mean_sq(h) * w)(x * rsqrt_mean_sq(x)))
    check_rewrite(chained, torch.randn(2, 5, HIDDEN), 2)
