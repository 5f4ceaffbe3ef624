"""The memoized Triton mutation analysis: what it keys on, what it refuses to key, and that the backend's compile
on a GPU runs it less often and gets the same results bit for bit (torch 2.11's `identify_mutated_tensors`)."""

import copy

import pytest
import sympy
import torch
import triton
import triton.language as tl
from torch._higher_order_ops import triton_kernel_wrap
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction

import liger_compile  # noqa: F401  (registers the backend)
from liger_compile.triton_analysis import analysis_key, memoize_mutation_analysis, memoizing
from tests.conftest import DEVICE
from tests.helpers import assert_close


class CountingAnalysis:
    """Stands in for torch's analysis: says every tensor argument is written, and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel, kwargs, tma_descriptor_metadata):
        self.calls += 1
        return [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]


@pytest.fixture
def fake():
    with FakeTensorMode() as mode:
        yield mode


# JITFunctions as on a GPU (`triton.jit` makes interpreted functions under the tests' TRITON_INTERPRET=1).
def _zero(x, n):
    tl.store(x + tl.arange(0, 2), tl.zeros((2,), tl.float32))


def _fill(x, n):
    tl.store(x + tl.arange(0, 2), tl.full((2,), n, tl.float32))


kernel_a, kernel_b = JITFunction(_zero), JITFunction(_fill)


def test_same_kernel_dtypes_and_values_are_analysed_once(fake):
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    x, y = torch.empty(8, 4, dtype=torch.bfloat16), torch.empty(3, 4, dtype=torch.bfloat16)  # shapes do not matter
    first = analyze(kernel_a, {"x": x, "out": x, "n": 4, "BLOCK": 128}, {})
    second = analyze(kernel_a, {"x": y, "out": y, "n": 4, "BLOCK": 128}, {})
    assert analysis.calls == 1
    assert first == second == ["x", "out"]
    second.append("changed")  # callers get their own list
    assert analyze(kernel_a, {"x": x, "out": x, "n": 4, "BLOCK": 128}, {}) == ["x", "out"]


def test_another_object_of_the_same_kernel_is_analysed_again(fake):
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    x = torch.empty(2, dtype=torch.float32)
    analyze(kernel_a, {"x": x, "n": 4}, {})
    analyze(copy.copy(kernel_a), {"x": x, "n": 4}, {})  # its source may have been changed since
    assert analysis.calls == 2


def test_autotuners_share_the_analysis_of_their_kernel_and_first_config(fake):
    """torch wraps a kernel launched with num_warps in a new single-config autotuner at every launch; its analysis
    reads the kernel and the config's arguments, as Inductor's lowering later passes them."""
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    x = torch.empty(2, dtype=torch.float32)

    def autotuned(**config_kwargs):
        return triton.autotune([triton.Config(config_kwargs, num_warps=4)], key=[])(kernel_a)

    for kernel in (autotuned(), autotuned()):
        analyze(kernel, {"x": x, "n": 4}, {})
    assert analysis.calls == 1
    analyze(kernel_a, {"x": x, "n": 4}, {})  # the lowering's call
    assert analysis.calls == 1
    analyze(autotuned(n=4), {"x": x}, {})  # the config supplies n
    assert analysis.calls == 1
    analyze(autotuned(n=16), {"x": x}, {})
    assert analysis.calls == 2


def test_symbolic_sizes_share_one_analysis(fake):
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    x = torch.empty(2, dtype=torch.float32)
    analyze(kernel_a, {"x": x, "n": sympy.Symbol("s0")}, {})
    analyze(kernel_a, {"x": x, "n": sympy.Symbol("s1") * 2}, {})
    assert analysis.calls == 1  # torch's analysis replaces every symbolic value by 2


@pytest.mark.parametrize("change", ["kernel", "dtype", "int value", "bool for int", "float for int", "new argument"])
def test_anything_the_analysis_reads_makes_a_new_entry(fake, change):
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    x = torch.empty(2, dtype=torch.float32)
    kernel, kwargs = kernel_a, {"x": x, "n": 1}
    analyze(kernel, kwargs, {})
    if change == "kernel":
        kernel = kernel_b
    elif change == "dtype":
        kwargs = {"x": x.to(torch.float16), "n": 1}
    elif change == "int value":
        kwargs = {"x": x, "n": 16}  # Triton specializes 1 and multiples of 16
    elif change == "bool for int":
        kwargs = {"x": x, "n": True}
    elif change == "float for int":
        kwargs = {"x": x, "n": 1.0}
    else:
        kwargs = {**kwargs, "m": None}
    analyze(kernel, kwargs, {})
    assert analysis.calls == 2


@pytest.mark.parametrize("unkeyable", ["real tensor", "tma descriptor", "list value"])
def test_what_cannot_be_keyed_exactly_is_analysed_every_time(unkeyable):
    analysis = CountingAnalysis()
    analyze = memoizing(analysis)
    kwargs, tma = {"x": torch.empty(2), "n": 1}, {}  # a real tensor: Triton specializes on its pointer's alignment
    if unkeyable == "tma descriptor":
        with FakeTensorMode():
            kwargs = {"x": torch.empty(2), "n": 1}
        tma = {"x": ("stable", ([16, 16],))}
    elif unkeyable == "list value":
        with FakeTensorMode():
            kwargs = {"x": torch.empty(2), "n": [1, 2]}
    assert analysis_key(kernel_a, kwargs, tma) is None
    for _ in range(2):
        analyze(kernel_a, kwargs, tma)
    assert analysis.calls == 2


def test_installs_once_over_a_function_of_the_expected_signature(monkeypatch):
    analysis = CountingAnalysis()

    def identify_mutated_tensors(kernel, kwargs, tma_descriptor_metadata):
        return analysis(kernel, kwargs, tma_descriptor_metadata)

    monkeypatch.setattr(triton_kernel_wrap, "identify_mutated_tensors", identify_mutated_tensors, raising=False)
    assert memoize_mutation_analysis()
    installed = triton_kernel_wrap.identify_mutated_tensors
    assert installed is not identify_mutated_tensors and installed.__wrapped__ is identify_mutated_tensors
    assert memoize_mutation_analysis() and triton_kernel_wrap.identify_mutated_tensors is installed


def test_leaves_another_signature_alone(monkeypatch):
    def identify_mutated_tensors(kernel, kwargs):
        return []

    monkeypatch.setattr(triton_kernel_wrap, "identify_mutated_tensors", identify_mutated_tensors, raising=False)
    assert not memoize_mutation_analysis()
    assert triton_kernel_wrap.identify_mutated_tensors is identify_mutated_tensors


def test_leaves_a_torch_without_the_function_alone(monkeypatch):
    monkeypatch.delattr(triton_kernel_wrap, "identify_mutated_tensors", raising=False)
    assert not memoize_mutation_analysis()
    assert not hasattr(triton_kernel_wrap, "identify_mutated_tensors")


def four_norms(x, weights):
    for weight in weights:  # one kernel launched four times on the same shapes
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = weight * (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)
    return x


def compiled_step(analysis, x, weights):
    """Output and gradients of `four_norms` compiled by the backend with `analysis` as torch's mutation analysis."""
    torch._dynamo.reset()
    triton_kernel_wrap.identify_mutated_tensors = analysis
    inputs = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    out = torch.compile(four_norms, backend="liger")(inputs[0], inputs[1:])
    out.sum().backward()
    return [out.detach(), *(t.grad for t in inputs)]


@pytest.mark.skipif(DEVICE != "cuda" or not hasattr(triton_kernel_wrap, "identify_mutated_tensors"),
                    reason="the analysis runs when Inductor compiles Triton kernels on a GPU (torch <= 2.12)")
def test_backend_analyses_each_launch_once_with_the_same_result(monkeypatch):
    torch_analysis = getattr(triton_kernel_wrap.identify_mutated_tensors, "__wrapped__",
                             triton_kernel_wrap.identify_mutated_tensors)
    monkeypatch.setattr(triton_kernel_wrap, "identify_mutated_tensors", torch_analysis)
    calls = {"torch's": [], "memoized": []}

    def counting(name):
        def identify_mutated_tensors(kernel, kwargs, tma_descriptor_metadata):
            calls[name].append(kernel.fn.__name__)
            return torch_analysis(kernel, kwargs, tma_descriptor_metadata)
        return identify_mutated_tensors

    unmemoized = counting("torch's")
    unmemoized.liger_results = {}  # looks installed, so the backend compiles with torch's analysis as it is
    x = torch.randn(64, 256, device=DEVICE, dtype=torch.float32)
    weights = [torch.randn(256, device=DEVICE) for _ in range(4)]
    # without the on-disk caches, which would let the second compile skip the work the analysis is part of
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        expected = compiled_step(unmemoized, x, weights)
        actual = compiled_step(counting("memoized"), x, weights)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)  # the same kernels, given the same clones: bit for bit
    reference = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    out = four_norms(reference[0], reference[1:])
    out.sum().backward()
    for a, e in zip(actual, [out, *(t.grad for t in reference)]):
        assert_close(a, e.detach(), torch.float32)
    assert {"_norm_forward_kernel", "_norm_backward_kernel"} <= set(calls["memoized"])
    # Each launch is met at three points of the compile; with the cache the later two reuse the first's result.
    assert 0 < 2 * len(calls["memoized"]) <= len(calls["torch's"])
