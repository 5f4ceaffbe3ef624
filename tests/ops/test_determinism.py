"""Determinism: with torch.use_deterministic_algorithms(True), every op gives bit-identical results and gradients
run after run (no atomics: the weight gradients of the norms are reduced from per-program partial rows), or raises
PyTorch's own error (cuBLAS matmuls of the fused linear losses without CUBLAS_WORKSPACE_CONFIG)."""

import pytest
import torch
import torch.nn.functional as F

import liger_compile
from tests.conftest import DEVICE

# On a GPU, enough rows for many programs to share each weight gradient; the interpreter runs programs in turn.
ROWS, WIDTH = (257, 1000) if DEVICE == "cuda" else (33, 200)


def inputs(*shapes, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(shape, device=DEVICE, generator=generator).requires_grad_() for shape in shapes]


def log_probabilities(seed):
    (logits,) = inputs((ROWS, WIDTH), seed=seed)
    return F.log_softmax(logits.detach(), -1).requires_grad_()


LABELS = torch.arange(ROWS, device=DEVICE) % WIDTH
CASES = {
    "rms_norm": lambda: (lambda x, w: liger_compile.ops.rms_norm(x, w, 1e-6), inputs((ROWS, WIDTH), (WIDTH,))),
    "layer_norm": lambda: (lambda x, w, b: liger_compile.ops.layer_norm(x, w, b, 1e-5),
                           inputs((ROWS, WIDTH), (WIDTH,), (WIDTH,))),
    "swiglu": lambda: (liger_compile.ops.swiglu, inputs((ROWS, WIDTH), (ROWS, WIDTH))),
    "rope_pair": lambda: (lambda q, k: torch.cat([t.flatten() for t in liger_compile.ops.rope_pair(
        q, k, torch.ones(1, 1, 64, 64, device=DEVICE) * 0.6, torch.ones(1, 1, 64, 64, device=DEVICE) * 0.8)]),
        inputs((4, 8, 64, 64), (4, 2, 64, 64))),
    "cross_entropy": lambda: (lambda x: liger_compile.ops.cross_entropy(x, LABELS), inputs((ROWS, WIDTH))),
    "embedding": lambda: (lambda w: liger_compile.ops.embedding(LABELS % 7, w), inputs((WIDTH, 64))),
    "fused_linear_cross_entropy": lambda: (
        lambda h, w: liger_compile.ops.fused_linear_cross_entropy(h, w, LABELS, chunk_rows=64),
        inputs((ROWS, 64), (WIDTH, 64))),
    "kl_div": lambda: (lambda s, t: liger_compile.ops.kl_div(s, t, "batchmean", True),
                       [log_probabilities(0), log_probabilities(1)]),
    "jsd": lambda: (lambda s, t: liger_compile.ops.jsd(s, t, LABELS, beta=0.3), [log_probabilities(0),
                                                                                   log_probabilities(1)]),
    "fused_linear_jsd": lambda: (
        lambda h, w: liger_compile.ops.fused_linear_jsd(h, w, h.detach() * 2, w.detach() * 0.5, LABELS, chunk_rows=64),
        inputs((ROWS, 64), (WIDTH, 64))),
}


def run(op, tensors):
    out = op(*tensors)
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    return [out.detach(), *grads]


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("case", CASES)
def test_bit_identical_or_pytorch_error(case, deterministic):
    op, tensors = CASES[case]()
    try:
        first = run(op, tensors)
    except RuntimeError as error:  # PyTorch's message names the setting that would make it deterministic
        assert "deterministic" in str(error) and "CUBLAS_WORKSPACE_CONFIG" in str(error), str(error)
        return
    second = run(op, tensors)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
