"""The RoPE rewrite: each spelling of ``x * cos + rotate_half(x) * sin`` (q and k paired, partial rotary taken
whole) is rewritten exactly; near-misses are left alone and reported."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_partial_rope

from tests.conftest import DEVICE
from tests.helpers import check_rewrite as check_family_rewrite, compile_and_report, rewritten_graph

HIDDEN, HEAD_DIM = 32, 16


def rotate_half(x):
    return torch.cat((-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]), dim=-1)


def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([torch.neg(x2), x1], -1)


def rotate_half_split(x):
    x1, x2 = torch.split(x, x.shape[-1] // 2, dim=-1)
    return torch.cat((x2.neg(), x1), dim=3)


def rotate_half_full_slices(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[:, :, :, half:], x[:, :, :, :half]), dim=-1)


def both(rotate, combine=lambda x, cos, sin, rotate: x * cos + rotate(x) * sin):
    """apply(q, k, cos, sin, unsqueeze_dim) rotating q and k with one rotate_half spelling."""
    def apply(q, k, cos, sin, unsqueeze_dim):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return combine(q, cos, sin, rotate), combine(k, cos, sin, rotate)
    return apply


class RotaryAttentionInputs(nn.Module):
    """q and k projections viewed as heads, rotated by `apply` with cos/sin of per-row position ids; returns
    both, flattened, so every gradient flows back through the rotation."""

    def __init__(self, apply, heads_first=True, heads_q=4, heads_k=2, rotary_dim=HEAD_DIM):
        super().__init__()
        self.apply_rope, self.heads_first = apply, heads_first
        self.q_proj = nn.Linear(HIDDEN, heads_q * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, heads_k * HEAD_DIM, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, HEAD_DIM)
        k = self.k_proj(x).view(batch, seq, -1, HEAD_DIM)
        if self.heads_first:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        # position ids that differ per batch row (left padding of the first row)
        positions = torch.arange(seq, device=x.device)[None, :] - torch.arange(batch, device=x.device)[:, None]
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = self.apply_rope(q, k, cos, sin, 1 if self.heads_first else 2)
        return self.combine(q, k)

    def combine(self, q, k):
        return torch.cat([q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1)], dim=-1)


def check_rewrite(module, expected_rewrites, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(2, 5, HIDDEN).to(dtype)
    return check_family_rewrite(module.to(dtype), x, "rope", expected_rewrites)


SPELLINGS = {
    "hf_llama": llama_rope,
    "chunk_and_torch.neg": both(rotate_half_chunk),
    "split_and_method_neg": both(rotate_half_split),
    "full_slices": both(rotate_half_full_slices),
    "operands_swapped": both(rotate_half, lambda x, cos, sin, rotate: sin * rotate(x) + cos * x),
    "torch.add_and_torch.mul": both(rotate_half, lambda x, c, s, rotate: torch.add(torch.mul(x, c), rotate(x).mul(s))),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("heads_first", [True, False], ids=["BHTD", "BTHD"])
def test_q_and_k_are_rotated_by_one_pair_op(spelling, heads_first):
    report = check_rewrite(RotaryAttentionInputs(SPELLINGS[spelling], heads_first), 1)
    assert [r.variant for r in report.rewrites] == ["q+k"]
    assert report.near_misses == []


def test_partial_rotary_is_taken_whole():
    module = RotaryAttentionInputs(phi3_partial_rope, rotary_dim=HEAD_DIM // 2)
    report = check_rewrite(module, 1)
    assert [r.variant for r in report.rewrites] == ["q+k partial"]


def test_bf16_matches_eager_rounding():
    check_rewrite(RotaryAttentionInputs(llama_rope), 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("apply,rotary_dim,variant", [(llama_rope, HEAD_DIM, "q+k"),
                                                       (phi3_partial_rope, HEAD_DIM // 2, "q+k partial")],
                         ids=["full", "partial"])
def test_bf16_heads_with_fp32_cos_promote_as_eager(apply, rotary_dim, variant):
    """As under autocast with fp32 parameters: bf16 q and k, fp32 cos and sin, fp32 results."""
    def fp32_cos(q, k, cos, sin, unsqueeze_dim):
        return apply(q, k, cos.float(), sin.float(), unsqueeze_dim)
    report = check_rewrite(RotaryAttentionInputs(fp32_cos, rotary_dim=rotary_dim), 1, dtype=torch.bfloat16)
    assert [r.variant for r in report.rewrites] == [variant]


def test_q_alone_and_separately_unsqueezed_cos_give_single_ops():
    def q_only(q, k, cos, sin, unsqueeze_dim):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k

    def own_unsqueezes(q, k, cos, sin, unsqueeze_dim):
        rotated = [x * cos.unsqueeze(unsqueeze_dim) + rotate_half(x) * sin.unsqueeze(unsqueeze_dim) for x in (q, k)]
        return tuple(rotated)

    assert [r.variant for r in check_rewrite(RotaryAttentionInputs(q_only), 1).rewrites] == ["single"]
    assert [r.variant for r in check_rewrite(RotaryAttentionInputs(own_unsqueezes), 2).rewrites] == ["single"] * 2


class RotaryAttention(RotaryAttentionInputs):
    """The rotated heads go into attention, whose output is flattened as HF does."""

    def combine(self, q, k):
        out = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).contiguous().reshape(out.shape[0], -1)


def rotate_first(q, k, cos, sin, unsqueeze_dim):
    """Eager's sum takes its first operand's layout: contiguous here (the cat's), the heads' for HF's order."""
    return both(rotate_half, lambda x, cos, sin, rotate: rotate(x) * sin + x * cos)(q, k, cos, sin, unsqueeze_dim)


class RotatedHeadsViewed(RotaryAttentionInputs):
    """``view`` needs the contiguous layout this eager code gives the rotated heads."""

    def combine(self, q, k):
        return torch.cat([q.view(q.shape[0], -1), k.view(k.shape[0], -1)], dim=-1)


class RotatedQReturned(RotaryAttentionInputs):
    """The rotated q is the graph's output, whose strides must be eager's (k is not rotated)."""

    def __init__(self, apply):
        super().__init__(lambda q, k, cos, sin, unsqueeze_dim: (apply(q, q, cos, sin, unsqueeze_dim)[0], k))

    def combine(self, q, k):
        return q


def layout_copies(module, x):
    """The ``contiguous`` copies of rope outputs in the graph the rope family makes of `module`'s Dynamo graph."""
    rope_ops = (torch.ops.liger.rope.default, torch.ops.liger.rope_pair.default)

    def from_rope(node):
        return node.target in rope_ops or (node.target is operator.getitem and node.args[0].target in rope_ops)
    graph = rewritten_graph(module, x, families=["rope"])
    return [n for n in graph.nodes if n.target == "contiguous" and from_rope(n.args[0])]


@pytest.mark.parametrize("heads_first", [True, False], ids=["BHTD", "BTHD"])
def test_rotated_heads_keep_their_layout_where_only_values_are_read(heads_first):
    module = RotaryAttention(llama_rope, heads_first=heads_first)
    check_rewrite(module, 1)
    assert layout_copies(module, torch.randn(2, 5, HIDDEN, device=DEVICE)) == []


@pytest.mark.parametrize("module,copies", [
    (RotatedHeadsViewed(rotate_first), 2), (RotatedQReturned(rotate_first), 1), (RotatedQReturned(llama_rope), 0),
], ids=["viewed", "returned", "returned_in_heads_layout"])
def test_rotated_heads_read_through_their_strides_get_eager_layout(module, copies):
    check_rewrite(module, 1)
    x = torch.randn(2, 5, HIDDEN, device=DEVICE)
    assert len(layout_copies(module, x)) == copies
    actual, _report = compile_and_report(module, x)
    assert actual.stride() == module(x).stride()


def rotate_half_wrong_way(x):
    return torch.cat((x[..., HEAD_DIM // 2:], -x[..., :HEAD_DIM // 2]), dim=-1)


class LearnedRotation(RotaryAttentionInputs):
    """cos and sin from a trained parameter: they need a gradient the op does not give."""

    def __init__(self):
        super().__init__(llama_rope)
        self.inv_freq = nn.Parameter(self.inv_freq.clone())


def upcast_cos(q, k, cos, sin, unsqueeze_dim):
    return llama_rope(q, k, cos.double(), sin.double(), unsqueeze_dim)


NEAR_MISSES = {
    "halves_swapped": (RotaryAttentionInputs(both(rotate_half_wrong_way)), "halves the other way round"),
    "learned_frequencies": (LearnedRotation(), "requires grad"),
    "fp64_cos": (RotaryAttentionInputs(lambda *args: [t.float() for t in upcast_cos(*args)]), "dtypes differ"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    module, reason = NEAR_MISSES[case]
    report = check_rewrite(module, 0)
    assert {m.family for m in report.near_misses} == {"rope"}, str(report)
    assert all(reason in m.reason for m in report.near_misses), str(report)


def interleaved_complex(q, k, cos, sin, unsqueeze_dim):
    """Meta's reference RoPE: adjacent pairs rotated as complex numbers (another layout of the rotation)."""
    freqs_cis = torch.polar(torch.ones_like(cos[..., : HEAD_DIM // 2]), torch.atan2(sin, cos)[..., : HEAD_DIM // 2])
    freqs_cis = freqs_cis.unsqueeze(unsqueeze_dim)

    def rotate(x):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)
    return rotate(q), rotate(k)


def rotate_every_two(q, k, cos, sin, unsqueeze_dim):
    """GPT-J's interleaved rotate_every_two: not the rotate_half layout."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def test_complex_form_is_reported():
    report = check_rewrite(RotaryAttentionInputs(interleaved_complex), 0)
    assert [m.family for m in report.near_misses] == ["rope", "rope"], str(report)
    assert "view_as_complex" in report.near_misses[0].reason


def quarters_rotated(q, k, cos, sin, unsqueeze_dim):
    """The first two quarters of q rotated into each other: split(x, d // 4) pieces, not halves."""
    cos, sin = cos.unsqueeze(unsqueeze_dim)[..., :HEAD_DIM // 2], sin.unsqueeze(unsqueeze_dim)[..., :HEAD_DIM // 2]
    pieces = q.split(HEAD_DIM // 4, dim=-1)
    rotated = q[..., :HEAD_DIM // 2] * cos + torch.cat((-pieces[1], pieces[0]), dim=-1) * sin
    return torch.cat((rotated, q[..., HEAD_DIM // 2:]), dim=-1), k


@pytest.mark.parametrize("apply", [
    quarters_rotated,
    rotate_every_two,
    both(lambda x: torch.cat((-x[..., HEAD_DIM // 2 + 1:], x[..., :HEAD_DIM // 2 + 1]), dim=-1)),  # uneven halves
    lambda q, k, cos, sin, d: (q * cos.unsqueeze(d) + rotate_half(k.repeat(1, 2, 1, 1)) * sin.unsqueeze(d), k),
], ids=["split_in_quarters", "rotate_every_two", "uneven_halves", "another_tensor_rotated"])
def test_other_sums_are_not_matched(apply):
    report = check_rewrite(RotaryAttentionInputs(apply), 0)
    assert report.near_misses == []


def test_switched_off_by_option():
    torch.manual_seed(0)
    module = RotaryAttentionInputs(llama_rope).to(DEVICE)
    _, report = compile_and_report(module, torch.randn(2, 5, HIDDEN, device=DEVICE), rope=False)
    assert report.counts().get("rope", 0) == 0
