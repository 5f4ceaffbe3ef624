"""The attention rewrite: a causal mask spelled out becomes ``is_causal=True``, repeated keys and values become
``enable_gqa=True``; masks not provably causal are left alone and reported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import check_rewrite, compile_and_report, tiny_causal_lm, variants

HEADS, KV_HEADS, HEAD_DIM, SEQ = 4, 2, 8, 6
CAUSAL, GQA = "causal mask -> is_causal", "repeated kv -> enable_gqa"


def positions(length, device):
    return torch.arange(length, device=device) + 0


def kv_le_q(q_len, kv_len, device):  # transformers' sdpa_mask under torch.compile on torch < 2.14
    return positions(kv_len, device)[None, None, None, :] <= positions(q_len, device)[None, None, :, None]


def q_ge_kv(q_len, kv_len, device):
    return torch.ge(torch.arange(q_len, device=device).view(q_len, 1), torch.arange(kv_len, device=device))


def packed_sequences(q_len, kv_len, device):
    """transformers' mask for packed sequences without a cache (e.g. under gradient checkpointing), over default
    positions: one sequence, so causal, but only evaluating it shows that."""
    position = torch.arange(kv_len, device=device)[None, :]
    sequence = (torch.diff(position, prepend=position[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    q, kv = torch.arange(q_len, device=device)[:, None], torch.arange(kv_len, device=device)[None, :]
    return torch.ones((), dtype=torch.bool, device=device) & (sequence[0, kv] == sequence[0, q]) & (
        position[0, kv] <= position[0, q])


def tril_of_ones(q_len, kv_len, device):
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()


def sliding_window(q_len, kv_len, device):  # causal within 3 positions (Mistral, Gemma 2): not the causal mask
    q, kv = torch.arange(q_len, device=device)[:, None], torch.arange(kv_len, device=device)[None, :]
    return (kv <= q) & (q - kv < 3)


def repeat_kv(x, n):  # transformers' repeat_kv
    batch, heads, length, width = x.shape
    return x[:, :, None, :, :].expand(batch, heads, n, length, width).reshape(batch, heads * n, length, width)


def repeat_interleave(x, n):
    return x.repeat_interleave(n, dim=1)


class Attention(nn.Module):
    def __init__(self, mask=None, repeat=None, kv_heads=KV_HEADS):
        super().__init__()
        self.q = nn.Linear(16, HEADS * HEAD_DIM, bias=False)
        self.kv = nn.Linear(16, 2 * kv_heads * HEAD_DIM, bias=False)
        self.mask, self.repeat, self.kv_heads = mask, repeat, kv_heads

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, self.kv_heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        if self.repeat is not None:
            k, v = self.repeat(k, HEADS // self.kv_heads), self.repeat(v, HEADS // self.kv_heads)
        mask = None if self.mask is None else self.mask(length, length, x.device).expand(batch, 1, length, length)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.mask is None)


def attention_input(batch=2, dtype=torch.float32):
    return torch.randn(batch, SEQ, 16, generator=torch.Generator().manual_seed(0)).to(dtype)


REWRITTEN = {
    "kv <= q, repeat_kv": (Attention(kv_le_q, repeat_kv), [f"{CAUSAL}, {GQA}"]),
    "q >= kv, repeat_interleave": (Attention(q_ge_kv, repeat_interleave), [f"{CAUSAL}, {GQA}"]),
    "kv <= q, no repeat": (Attention(kv_le_q, None, kv_heads=HEADS), [CAUSAL]),
    "is_causal, repeat_kv": (Attention(None, repeat_kv), [GQA]),
    "packed-sequence mask, evaluated": (Attention(packed_sequences, repeat_kv), [f"{CAUSAL}, {GQA}"]),
    "tril of ones, evaluated": (Attention(tril_of_ones, None, kv_heads=HEADS), [CAUSAL]),
}


@pytest.mark.parametrize("case", REWRITTEN)
def test_rewritten_spellings_match_eager(case):
    module, expected = REWRITTEN[case]
    torch.manual_seed(0)
    report = check_rewrite(module, attention_input(), "attention", 1)
    assert variants(report, "attention") == expected
    assert report.near_misses == []


def test_bf16_with_a_batch_of_one():
    torch.manual_seed(0)
    report = check_rewrite(Attention(kv_le_q, repeat_kv).bfloat16(), attention_input(1, torch.bfloat16),
                           "attention", 1)
    assert variants(report, "attention") == [f"{CAUSAL}, {GQA}"]


NEAR_MISSES = {
    "offset": (lambda q, kv, d: positions(kv, d)[None, :] <= positions(q, d)[:, None] + 1, "an offset"),
    "strict <": (lambda q, kv, d: positions(kv, d)[None, :] < positions(q, d)[:, None], "lt"),
    "swapped": (lambda q, kv, d: positions(q, d)[:, None] <= positions(kv, d)[None, :], "not key <= query"),
    "step 2": (lambda q, kv, d: torch.arange(0, 2 * kv, 2, device=d)[None, :] <= torch.arange(
        0, 2 * q, 2, device=d)[:, None], "an offset or a step"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_masks_not_provably_causal_are_left_alone_and_reported(case):
    mask, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    report = check_rewrite(Attention(mask, None, kv_heads=HEADS), attention_input(), "attention", 0)
    assert [m.family for m in report.near_misses] == ["attention"], str(report)
    assert reason in report.near_misses[0].reason


def test_repeated_kv_with_another_mask_is_left_alone():
    def padded(q_len, kv_len, device):  # a padding mask: keys 0..kv_len-2 visible
        return (positions(kv_len, device) < kv_len - 1)[None, None, None, :].expand(1, 1, q_len, kv_len)

    torch.manual_seed(0)
    report = check_rewrite(Attention(padded, repeat_kv), attention_input(), "attention", 0)
    assert report.near_misses == []  # not inexact: enable_gqa with a mask would only be slower on CUDA


def test_a_sliding_window_built_from_constants_is_left_alone():
    """Evaluated, it differs from the causal mask (keys more than 2 positions back are hidden): not rewritten."""
    torch.manual_seed(0)
    report = check_rewrite(Attention(sliding_window, repeat_kv), attention_input(), "attention", 0)
    assert report.near_misses == []


def test_a_constant_mask_built_through_floats_is_not_evaluated():
    """Causal in value, but its positions are float cumulative sums, whose rounding could differ on the model's
    device from the CPU's: sums and differences are evaluated on integers and booleans only."""
    def float_positions(q_len, kv_len, device):
        q = torch.ones(q_len, device=device).cumsum(0)[:, None]
        kv = torch.ones(kv_len, device=device).cumsum(0)[None, :]
        return kv <= q

    torch.manual_seed(0)
    report = check_rewrite(Attention(float_positions, repeat_kv), attention_input(), "attention", 0)
    assert report.near_misses == []


def test_switchable():
    torch.manual_seed(0)
    report = check_rewrite(Attention(kv_le_q, repeat_kv), attention_input(), "attention", 0, attention=False)
    assert report.near_misses == []


@pytest.mark.parametrize("checkpointing", [False, True], ids=["cache", "checkpointing"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_hf_causal_mask_of_older_torch_compiles_to_is_causal(model_type, checkpointing, monkeypatch):
    """Before pytorch#176499 (torch < 2.14) transformers builds its causal mask under torch.compile, as it does
    here when told it is exporting. With gradient checkpointing it uses no cache and builds its packed-sequence
    mask from the default positions instead, outside the checkpointed layers that receive it: evaluated there, it
    is the causal mask."""
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "is_torchdynamo_exporting", lambda: True)
    model, reference = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    for m in (model, reference):
        m.config._attn_implementation = "sdpa"
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, report = compile_and_report(lambda i: model(input_ids=i, labels=i).loss, ids)
    expected = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    expected.backward()
    assert variants(report, "attention") == [f"{CAUSAL}, {GQA}"] * 2, str(report)
    torch.testing.assert_close(loss, expected)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


class CheckpointedLayers(nn.Module):
    """A causal mask built once, handed to two attention layers that run under activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Attention(None, repeat_kv) for _ in range(2)])

    def forward(self, x):
        batch, length, _ = x.shape
        mask = kv_le_q(length, length, x.device).expand(batch, 1, length, length)
        for layer in self.layers:
            x = x + torch.utils.checkpoint.checkpoint(self.attend, layer, x, mask, use_reentrant=False)
        return x

    @staticmethod
    def attend(layer, x, mask):
        batch, length, _ = x.shape
        q = layer.q(x).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = layer.kv(x).view(batch, length, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, length, HEADS * HEAD_DIM)[..., :16]


def test_a_mask_handed_into_checkpointed_layers_is_read_where_it_was_built():
    torch.manual_seed(0)
    report = check_rewrite(CheckpointedLayers(), attention_input(), "attention", 2)
    assert variants(report, "attention") == [f"{CAUSAL}, {GQA}"] * 2, str(report)


class BroadcastQuery(nn.Module):
    """One query head attending with every repeated key head (SDPA broadcasts it): not grouped-query attention."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, HEAD_DIM, bias=False)
        self.kv = nn.Linear(16, 2 * KV_HEADS * HEAD_DIM, bias=False)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, 1, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_query_head_broadcast_against_repeated_keys_is_left_alone():
    torch.manual_seed(0)
    report = check_rewrite(BroadcastQuery(), attention_input(), "attention", 0)
    assert report.near_misses == []
