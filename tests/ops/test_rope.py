"""torch.ops.liger.rope / rope_pair: opcheck, forward/backward against autograd of the eager HF code, errors."""

import pytest
import torch
from torch.library import opcheck

import liger_compile
from liger_compile.ops import LigerOpError
from tests.conftest import DEVICE
from tests.helpers import assert_close


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(x, cos, sin):
    """HF's apply_rotary_pos_emb for one tensor, partial rotary included (GPT-NeoX / Phi)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def cos_sin(positions, rotary_dim, dtype, scale=1.0):
    """cos/sin as an HF rotary embedding computes them for (B, T) position ids (linear scaling by `scale`)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=DEVICE).float() / rotary_dim))
    freqs = (positions[..., None].float() / scale) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def qk(batch, heads_q, heads_k, seq, head_dim, dtype, heads_first, seed=0):
    """q and k as attention makes them: a (B, T, H*D) projection viewed as heads, transposed for BHTD."""
    torch.manual_seed(seed)

    def heads(n):
        x = torch.randn(batch, seq, n * head_dim, device=DEVICE).to(dtype).view(batch, seq, n, head_dim)
        return (x.transpose(1, 2) if heads_first else x).requires_grad_()
    return heads(heads_q), heads(heads_k)


def random_positions(batch, seq, seed=0):
    """Different, unordered position ids per batch row (packed sequences, left padding, ...)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4096, (batch, seq), generator=generator).to(DEVICE)


def check_against_eager(q, k, cos, sin, out_q, out_k):
    dq_out, dk_out = torch.randn_like(out_q), torch.randn_like(out_k)
    torch.autograd.backward((out_q, out_k), (dq_out, dk_out))
    q_ref, k_ref = (t.detach().clone().requires_grad_() for t in (q, k))
    expected_q, expected_k = eager_rope(q_ref, cos, sin), eager_rope(k_ref, cos, sin)
    torch.autograd.backward((expected_q, expected_k), (dq_out, dk_out))
    assert_close(out_q, expected_q)
    assert_close(out_k, expected_k)
    assert_close(q.grad, q_ref.grad)
    assert_close(k.grad, k_ref.grad)


# (head_dim, rotary_dim): full, odd head dims, partial rotary
HEAD_DIMS = [(64, 64), (48, 48), (80, 80), (96, 96), (64, 16), (80, 40)]


@pytest.mark.parametrize("head_dim,rotary_dim", HEAD_DIMS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["BHTD", "BTHD"])
def test_pair_matches_eager(op_path, head_dim, rotary_dim, dtype, heads_first):
    batch, seq = 2, 7
    q, k = qk(batch, 4, 2, seq, head_dim, dtype, heads_first)  # GQA: 4 q heads, 2 k heads
    cos, sin = cos_sin(random_positions(batch, seq), rotary_dim, dtype, scale=4.0)
    cos, sin = cos.unsqueeze(1 if heads_first else 2), sin.unsqueeze(1 if heads_first else 2)
    out_q, out_k = torch.ops.liger.rope_pair(q, k, cos, sin)
    assert out_q.shape == q.shape and out_q.dtype == dtype
    # laid out as the inputs, as a rotation in place leaves them: attention reads q and k as the projection made them
    assert out_q.stride() == q.stride() and out_k.stride() == k.stride()
    check_against_eager(q, k, cos, sin, out_q, out_k)
    assert q.grad.stride() == q.stride() and k.grad.stride() == k.stride()  # free to flow back through the view


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 40)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_heads_with_fp32_cos_give_fp32(op_path, head_dim, rotary_dim, dtype):
    """HF under autocast with fp32 parameters: q and k from a bf16 linear, cos and sin fp32 (as the hidden states
    are). Eager promotes to fp32; backward rounds each product to the heads' dtype, as autograd does."""
    q, k = qk(2, 4, 2, 7, head_dim, dtype, heads_first=True)
    cos, sin = (t.unsqueeze(1) for t in cos_sin(random_positions(2, 7), rotary_dim, torch.float32))
    out_q, out_k = torch.ops.liger.rope_pair(q, k, cos, sin)
    assert out_q.dtype == out_k.dtype == torch.float32
    check_against_eager(q, k, cos, sin, out_q, out_k)
    assert q.grad.dtype == k.grad.dtype == dtype


@pytest.mark.parametrize("cos_shape", [(1, 1, 5, 32), (5, 32), (2, 3, 5, 32)], ids=["batch-shared", "2-D", "per-head"])
def test_single_tensor_with_any_broadcast_of_cos(op_path, cos_shape):
    q, _ = qk(2, 3, 1, 5, 32, torch.float32, heads_first=True, seed=1)
    torch.manual_seed(2)
    cos, sin = torch.randn(cos_shape, device=DEVICE), torch.randn(cos_shape, device=DEVICE)
    out = liger_compile.ops.rope(q, cos, sin)
    dy = torch.randn_like(out)
    out.backward(dy)
    q_ref = q.detach().clone().requires_grad_()
    expected = eager_rope(q_ref, cos, sin)
    expected.backward(dy)
    assert_close(out, expected)
    assert_close(q.grad, q_ref.grad)


@pytest.mark.parametrize("heads_first", [True, False], ids=["BHTD", "BTHD"])
def test_pair_with_a_single_position(op_path, heads_first):
    """Decoding one token of one sequence: cos has size 1 along every leading dim, and q and k (GQA) differ only
    in their heads, which is how the op tells the heads dim."""
    q, k = qk(1, 4, 2, 1, 64, torch.float32, heads_first)
    cos, sin = cos_sin(random_positions(1, 1), 64, torch.float32)
    cos, sin = cos.unsqueeze(1 if heads_first else 2), sin.unsqueeze(1 if heads_first else 2)
    check_against_eager(q, k, cos, sin, *torch.ops.liger.rope_pair(q, k, cos, sin))


def test_lower_dims_and_one_gradient_of_the_pair(op_path):
    torch.manual_seed(3)
    q, k = torch.randn(6, 3, 16, device=DEVICE, requires_grad=True), torch.randn(6, 1, 16, device=DEVICE)
    cos, sin = torch.randn(6, 1, 16, device=DEVICE), torch.randn(6, 1, 16, device=DEVICE)
    out_q, out_k = liger_compile.ops.rope_pair(q, k, cos, sin)
    (out_q.sum() + out_k.sum()).backward()
    q_ref = q.detach().clone().requires_grad_()
    eager_rope(q_ref, cos, sin).sum().backward()
    assert_close(out_k, eager_rope(k, cos, sin))
    assert_close(q.grad, q_ref.grad)


SAMPLES = [(torch.float32, True, 32), (torch.bfloat16, False, 32), (torch.float16, True, 16)]


def test_opcheck_with_fp32_cos(op_path):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("see test_opcheck")
    q, k = qk(2, 4, 2, 5, 32, torch.bfloat16, heads_first=True)
    cos, sin = (t.unsqueeze(1) for t in cos_sin(random_positions(2, 5), 16, torch.float32))
    opcheck(torch.ops.liger.rope_pair.default, (q, k, cos, sin))
    opcheck(torch.ops.liger.rope_backward.default, (torch.randn_like(q, dtype=torch.float32), cos, sin,
                                                    [0, 2, 1, 3], torch.bfloat16))


@pytest.mark.parametrize("dtype,heads_first,rotary_dim", SAMPLES)
def test_opcheck(op_path, dtype, heads_first, rotary_dim):
    if op_path == "kernel" and DEVICE == "cpu":
        pytest.skip("on CPU eager runs the interpreted kernel and traced graphs the reference, which round "
                    "differently (the interpreter truncates to bf16); the GPU suite runs opcheck through the kernels")
    q, k = qk(2, 4, 2, 5, 32, dtype, heads_first)
    cos, sin = cos_sin(random_positions(2, 5), rotary_dim, dtype)
    cos, sin = cos.unsqueeze(1 if heads_first else 2), sin.unsqueeze(1 if heads_first else 2)
    opcheck(torch.ops.liger.rope.default, (q, cos, sin))
    opcheck(torch.ops.liger.rope_pair.default, (q, k, cos, sin))
    layout = [0, 2, 1, 3] if heads_first else [0, 1, 2, 3]  # (B, T, H, D) in memory, as q
    opcheck(torch.ops.liger.rope_backward.default, (torch.randn_like(q), cos, sin, layout, dtype))
    opcheck(torch.ops.liger.rope_pair_backward.default,
            (torch.randn_like(q), torch.randn_like(k), cos, sin, layout, [3, 2, 1, 0], dtype))


def test_compiles_with_dynamic_shapes_without_recompiling():
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    def both_ops(q, k, cos, sin):
        return torch.ops.liger.rope_pair(q, k, cos, sin), torch.ops.liger.rope(q, cos, sin)

    fn = torch.compile(both_ops, backend=counting_backend, dynamic=True, fullgraph=True)
    for seq in (3, 5, 11):
        q, k = qk(2, 4, 2, seq, 32, torch.float32, heads_first=True)
        cos, sin = (t.unsqueeze(1) for t in cos_sin(random_positions(2, seq), 32, torch.float32))
        (out_q, out_k), out_q_alone = fn(q, k, cos, sin)
        assert_close(out_q, eager_rope(q, cos, sin))
        assert_close(out_k, eager_rope(k, cos, sin))
        assert_close(out_q_alone, eager_rope(q, cos, sin))
    assert len(calls) == 1


def _tensors(*shapes, dtype=torch.float32):
    return [torch.ones(shape, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("call,message", [
    (lambda: torch.ops.liger.rope(*_tensors((2, 3, 4, 16), (2, 1, 4, 15), (2, 1, 4, 15))),
     r"liger::rope: cos/sin's last dim \(rotary_dim 15\) must be even"),
    (lambda: torch.ops.liger.rope(*_tensors((2, 3, 4, 16), (2, 1, 4, 32), (2, 1, 4, 32))),
     r"liger::rope: cos/sin's last dim \(rotary_dim 32\) must be even, positive and at most x's head_dim 16"),
    (lambda: torch.ops.liger.rope(*_tensors((2, 3, 4, 16), (2, 1, 4, 16), (2, 1, 5, 16))),
     r"liger::rope: cos \(2, 1, 4, 16\) and sin \(2, 1, 5, 16\) must have one shape"),
    (lambda: torch.ops.liger.rope(*_tensors((2, 3, 4, 16), (2, 1, 5, 16), (2, 1, 5, 16))),
     r"liger::rope: cos/sin \(2, 1, 5, 16\) must broadcast to x's leading dims \(2, 3, 4\)"),
    (lambda: torch.ops.liger.rope(*_tensors((2, 3, 4, 16), (3, 4, 16), (3, 4, 16), dtype=torch.int64)),
     "liger::rope: x must be float32, float16 or bfloat16"),
    (lambda: torch.ops.liger.rope(torch.ones(2, 3, 4, 16), torch.ones(4, 16), torch.ones(4, 16, dtype=torch.half)),
     "liger::rope: cos and sin must have one dtype, got torch.float32 and torch.float16"),
    (lambda: torch.ops.liger.rope_pair(torch.ones(2, 3, 4, 16), torch.ones(2, 3, 4, 16, dtype=torch.half),
                                       *_tensors((4, 16), (4, 16))),
     "liger::rope_pair: q and k must have one dtype"),
    (lambda: torch.ops.liger.rope(*_tensors((1, 2, 3, 4, 16), (4, 16), (4, 16))),
     r"liger::rope: x must have 1 to 4 dims"),
    (lambda: torch.ops.liger.rope_pair(*_tensors((2, 4, 5, 16), (3, 2, 5, 16), (2, 1, 5, 16), (2, 1, 5, 16))),
     r"liger::rope_pair: cos/sin \(2, 1, 5, 16\) must broadcast to k's leading dims"),
    (lambda: torch.ops.liger.rope_pair(*_tensors((2, 4, 5, 16), (1, 2, 5, 16), (1, 1, 5, 16), (1, 1, 5, 16))),
     r"liger::rope_pair: q \(2, 4, 5, 16\) and k \(1, 2, 5, 16\) may differ only in the heads dim"),
    (lambda: torch.ops.liger.rope_backward(*_tensors((2, 3, 4, 16), (4, 16), (4, 16)), [0, 1, 2], torch.float32),
     r"liger::rope_backward: layout must be a permutation of dy's 4 dims, got \[0, 1, 2\]"),
    (lambda: torch.ops.liger.rope(torch.ones(2, 3, 4, 16, requires_grad=True), torch.ones(4, 16, requires_grad=True),
                                  torch.ones(4, 16)),
     "liger::rope: cos and sin get no gradient from this op"),
])
def test_bad_input_names_the_op(call, message):
    with pytest.raises(LigerOpError, match=message):
        call()
