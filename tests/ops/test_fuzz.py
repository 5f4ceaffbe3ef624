"""Property-based sweep of every op against eager PyTorch, forward and backward: shapes (one row, odd and very wide
rows), dtypes, memory layouts (transposed, strided, expanded weights) and values (large magnitudes, -inf logits,
every label ignored). Examples are drawn from a fixed seed; ``LIGER_COMPILE_FUZZ_EXAMPLES`` sets how many per op
(a few in the CPU suite, where the kernels run in the interpreter; hundreds in the GPU run)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import liger_compile
from tests.conftest import DEVICE
from tests.ops.test_divergence import eager_jsd
from tests.ops.test_rope import eager_rope

EXAMPLES = int(os.environ.get("LIGER_COMPILE_FUZZ_EXAMPLES", "6"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])
# Row widths: one element, odd, not a power of two, wider than one tile of the row kernels.
WIDTHS = st.sampled_from([1, 2, 7, 48, 129, 1000, 5000])
ROWS = st.sampled_from([1, 2, 5, 17])
SCALES = st.sampled_from([1e-3, 1.0, 30.0])
# A norm over one column is ±1 whatever x, its gradient 0 but for eps: a difference of rounding errors.
NORM_WIDTHS = WIDTHS.filter(lambda width: width > 1)


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` (2-D) with the same entries in another memory layout: column-major, or every other column of a
    tensor twice as wide."""
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(values.shape[0], 2 * values.shape[1], dtype=values.dtype, device=values.device)
        wide[:, ::2] = values
        return wide[:, ::2]
    return values


def tensor(shape, dtype, layout="contiguous", scale=1.0, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    values = (torch.randn(shape, device=DEVICE, generator=generator) * scale).to(dtype)
    return laid_out(values, layout) if len(shape) == 2 else values


def evaluate(fn, inputs, cotangent=None):
    """fn(*inputs) and, for `cotangent`, the gradients of the inputs that require one."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if cotangent is None or not wanted or not out.requires_grad:
        return out, []
    return out, list(torch.autograd.grad(out, wanted, cotangent.to(out.dtype)))


def as_double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def assert_near(actual, expected, exact, tolerance):
    """`actual` within `tolerance` of the exact value (the reference in float64), or no more than twice as far from
    it as eager PyTorch in the inputs' dtype is: eager's own rounding can exceed any fixed tolerance where the exact
    value is 0 (the gradient of a LayerNorm over two columns)."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "non-finite values differ"
    actual, expected, exact = (t[finite].double() for t in (actual, expected, exact))
    error = (actual - exact).norm().item()
    bound = max(tolerance * exact.norm().item(), 2 * (expected - exact).norm().item())
    assert error <= bound, f"error {error:.3g} > {bound:.3g} (‖exact‖ {exact.norm().item():.3g})"


def check(op, reference, inputs, dtype, *, tolerance=None):
    """op(*inputs) against reference(*inputs): values, and the gradient of every input that requires one."""
    tolerance = tolerance or {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    expected, _ = evaluate(reference, inputs)
    cotangent = torch.rand(expected.shape, device=expected.device, dtype=torch.float64)
    actual, grads = evaluate(op, inputs, cotangent)
    expected, expected_grads = evaluate(reference, inputs, cotangent)
    exact, exact_grads = evaluate(reference, [as_double(t) for t in inputs], cotangent)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert_near(actual, expected, exact, tolerance)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad, exact_grad in zip(grads, expected_grads, exact_grads):
        assert grad.dtype == expected_grad.dtype
        assert_near(grad, expected_grad, exact_grad, tolerance)


def upcast(t):
    """``t.float()`` as the references write it, but float64 stays float64 (for the exact values)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hf_rms_norm(x, weight, eps):
    y = upcast(x) * torch.rsqrt(upcast(x).pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@fuzz
@given(rows=ROWS, width=NORM_WIDTHS, dtype=DTYPES, layout=LAYOUTS, scale=SCALES, expanded_weight=st.booleans())
def test_rms_norm(rows, width, dtype, layout, scale, expanded_weight):
    x = tensor((rows, width), dtype, layout, scale).requires_grad_()
    weight = (torch.ones(1, device=DEVICE, dtype=dtype).expand(width) if expanded_weight
              else tensor((width,), dtype, seed=1)).requires_grad_(not expanded_weight)
    check(lambda x, w: liger_compile.ops.rms_norm(x, w, 1e-6), lambda x, w: hf_rms_norm(x, w, 1e-6),
          [x, weight], dtype)


@fuzz
@given(rows=ROWS, width=NORM_WIDTHS, dtype=DTYPES, layout=LAYOUTS, scale=SCALES)
def test_layer_norm(rows, width, dtype, layout, scale):
    x = tensor((rows, width), dtype, layout, scale).requires_grad_()
    weight, bias = tensor((width,), dtype, seed=1).requires_grad_(), tensor((width,), dtype, seed=2).requires_grad_()
    check(lambda x, w, b: liger_compile.ops.layer_norm(x, w, b, 1e-5),
          lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-5), [x, weight, bias], dtype)


@fuzz
@given(rows=ROWS, width=WIDTHS, dtype=DTYPES, layout=LAYOUTS, scale=SCALES,
       activation=st.sampled_from(["swiglu", "geglu"]))
def test_gated_activations(rows, width, dtype, layout, scale, activation):
    a = tensor((rows, width), dtype, layout, scale).requires_grad_()
    b = tensor((rows, width), dtype, layout, seed=1).requires_grad_()
    if activation == "swiglu":
        check(liger_compile.ops.swiglu, lambda a, b: F.silu(a) * b, [a, b], dtype)
    else:
        check(liger_compile.ops.geglu, lambda a, b: F.gelu(a, approximate="tanh") * b, [a, b], dtype)


@fuzz
@given(batch=st.sampled_from([1, 3]), seq=st.sampled_from([1, 5]), heads=st.sampled_from([(1, 1), (4, 2)]),
       dims=st.sampled_from([(2, 2), (48, 48), (80, 40), (128, 64)]), dtype=DTYPES, heads_first=st.booleans(),
       cos_dtype=st.sampled_from([None, torch.float32]))
def test_rope_pair(batch, seq, heads, dims, dtype, heads_first, cos_dtype):
    (heads_q, heads_k), (head_dim, rotary_dim) = heads, dims

    def projected(n, seed):  # (B, T, H*D) viewed as heads, transposed when heads come first: a strided view
        x = tensor((batch, seq, n * head_dim), dtype, seed=seed).view(batch, seq, n, head_dim)
        return (x.transpose(1, 2) if heads_first else x).requires_grad_()
    q, k = projected(heads_q, 0), projected(heads_k, 1)
    angles = tensor((batch, seq, rotary_dim), torch.float32, scale=100.0, seed=2).unsqueeze(1 if heads_first else 2)
    cos, sin = (f(angles).to(cos_dtype or dtype) for f in (torch.cos, torch.sin))
    check(lambda q, k: torch.cat([t.flatten() for t in liger_compile.ops.rope_pair(q, k, cos, sin)]),
          lambda q, k: torch.cat([eager_rope(q, cos, sin).flatten(), eager_rope(k, cos, sin).flatten()]),
          [q, k], dtype)


def labels_for(rows, classes, ignored, seed):
    """Labels in [0, classes), `ignored` of them (a fraction; 1.0: every one) set to -100."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), device=DEVICE, generator=generator)
    n_ignored = math.ceil(ignored * rows)
    labels[torch.randperm(rows, device=DEVICE, generator=generator)[:n_ignored]] = -100
    return labels


def mask_logits(logits, labels):
    """-inf on every third class but the labelled ones (a masked vocabulary)."""
    masked = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    masked[::3] = True
    masked[labels[labels >= 0]] = False
    return logits.masked_fill(masked, float("-inf"))


@fuzz
@given(rows=ROWS, classes=st.sampled_from([2, 129, 5000]), dtype=DTYPES, layout=LAYOUTS, scale=SCALES,
       ignored=st.sampled_from([0.0, 0.5, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       label_smoothing=st.sampled_from([0.0, 0.1]), masked=st.booleans())
def test_cross_entropy(rows, classes, dtype, layout, scale, ignored, reduction, label_smoothing, masked):
    labels = labels_for(rows, classes, ignored, seed=3)
    logits = tensor((rows, classes), dtype, layout, scale)
    logits = (mask_logits(logits, labels) if masked and label_smoothing == 0 else logits).requires_grad_()
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    check(lambda x: liger_compile.ops.cross_entropy(x, labels, **options),
          lambda x: F.cross_entropy(upcast(x), labels, **options), [logits], dtype)


@fuzz
@given(rows=ROWS, hidden=st.sampled_from([8, 48]), classes=st.sampled_from([3, 129, 1000]), dtype=DTYPES,
       ignored=st.sampled_from([0.0, 0.5, 1.0]), reduction=st.sampled_from(["mean", "sum"]),
       bias=st.booleans(), chunk_rows=st.sampled_from([0, 1, 3]))
def test_fused_linear_cross_entropy(rows, hidden, classes, dtype, ignored, reduction, bias, chunk_rows):
    labels = labels_for(rows, classes, ignored, seed=3)
    h = tensor((rows, hidden), dtype).requires_grad_()
    weight = tensor((classes, hidden), dtype, scale=0.3, seed=1).requires_grad_()
    b = tensor((classes,), dtype, seed=2).requires_grad_() if bias else None
    check(lambda h, w, b: liger_compile.ops.fused_linear_cross_entropy(h, w, labels, b, reduction=reduction,
                                                                       chunk_rows=chunk_rows),
          lambda h, w, b: F.cross_entropy(upcast(F.linear(h, w, b)), labels, reduction=reduction), [h, weight, b],
          dtype, tolerance=None if dtype == torch.float32 else 5e-2)


@fuzz
@given(rows=ROWS, classes=WIDTHS, dtype=DTYPES, layout=LAYOUTS, scale=SCALES, log_target=st.booleans(),
       reduction=st.sampled_from(["batchmean", "sum", "none"]))
def test_kl_div(rows, classes, dtype, layout, scale, log_target, reduction):
    student = laid_out(torch.log_softmax(tensor((rows, classes), torch.float32, scale=scale), -1).to(dtype), layout)
    teacher = torch.log_softmax(tensor((rows, classes), torch.float32, seed=1), -1)
    teacher = (teacher if log_target else teacher.exp()).to(dtype)
    check(lambda s, t: liger_compile.ops.kl_div(s, t, reduction, log_target),
          lambda s, t: F.kl_div(s, t, reduction=reduction, log_target=log_target),
          [student.requires_grad_(), teacher.requires_grad_()], dtype)


@fuzz
@given(rows=ROWS, classes=WIDTHS, dtype=DTYPES, layout=LAYOUTS, scale=SCALES,
       beta=st.sampled_from([0.0, 0.3, 1.0]), ignored=st.sampled_from([0.0, 0.5, 1.0]))
def test_jsd(rows, classes, dtype, layout, scale, beta, ignored):
    labels = labels_for(rows, classes, ignored, seed=3)
    student = laid_out(torch.log_softmax(tensor((rows, classes), torch.float32, scale=scale), -1).to(dtype), layout)
    teacher = torch.log_softmax(tensor((rows, classes), torch.float32, seed=1), -1).to(dtype)
    if ignored == 1.0:  # every row ignored: a sum of nothing
        loss = liger_compile.ops.jsd(student, teacher, labels, beta=beta, reduction="sum")
        assert loss.item() == 0.0
        return
    check(lambda s, t: liger_compile.ops.jsd(s, t, labels, beta=beta),
          lambda s, t: eager_jsd(s, t, labels, beta=beta), [student.requires_grad_(), teacher],
          dtype, tolerance=None if dtype == torch.float32 else 5e-2)


@fuzz
# widths up to 1000 (several column blocks): the interpreter runs a backward program per id and column block
@given(vocab=st.sampled_from([1, 7, 129]), width=st.sampled_from([1, 7, 129, 1000]), dtype=DTYPES, layout=LAYOUTS,
       scale=SCALES, ids_shape=st.sampled_from([(1,), (17,), (3, 40)]), padding=st.sampled_from([None, 0, -1]))
def test_embedding(vocab, width, dtype, layout, scale, ids_shape, padding):
    generator = torch.Generator(device=DEVICE).manual_seed(vocab + width)
    ids = torch.randint(0, vocab, ids_shape, device=DEVICE, generator=generator)  # repeats whenever vocab < ids
    weight = tensor((vocab, width), dtype, layout, scale).requires_grad_()
    check(lambda i, w: liger_compile.ops.embedding(i, w, padding), lambda i, w: F.embedding(i, w, padding),
          [ids, weight], dtype)


def test_examples_setting_is_a_positive_number():
    assert EXAMPLES > 0, "LIGER_COMPILE_FUZZ_EXAMPLES must be positive"


pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
