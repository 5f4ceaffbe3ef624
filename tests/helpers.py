"""Shared test utilities: tolerances, comparisons, tiny models, compiling with a report."""

from __future__ import annotations

import importlib.util
import os

import torch

from liger_compile.report import collect

# (rtol, atol) against an eager PyTorch reference. bf16 carries 8 significant bits, and the Triton
# interpreter truncates when it rounds fp32 to bf16 (GPUs round to nearest), so bf16 allows a few ulps.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


REPOSITORY = os.path.join(os.path.dirname(__file__), "..")


def load_script(path: str):
    """The module of the script at `path` (relative to the repository root: examples/, benchmarks/), which are
    not packages, loaded without running its ``__main__`` block."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPOSITORY, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                 rtol: float | None = None, atol: float | None = None):
    """Compare with the tolerance of `dtype` (default: the expected tensor's), overridable per call."""
    default_rtol, default_atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol or default_rtol, atol=atol or default_atol)


def compile_and_report(fn, *args, compiler: str = "aot_eager", **options):
    """Compile `fn` with the liger backend, call it on `args`, return (output, Report of that compile)."""
    with collect() as report:
        out = torch.compile(fn, backend="liger", options={"compiler": compiler, **options})(*args)
    return out, report


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """A 2-layer transformers causal LM with random weights and dropout off, built offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    for name in list(vars(config)):
        if "dropout" in name or "pdrop" in name:
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)



def assert_relative_error(actual: torch.Tensor, expected: torch.Tensor, tolerance: float):
    """‖actual − expected‖ / ‖expected‖ ≤ tolerance: for reductions, whose elements can cancel to near zero."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    error = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g}"


def check_rewrite(module, x, family: str, expected_rewrites: int, **options):
    """Compile `module` with the backend (aot_eager, and `options`) on input `x`: check that `family` rewrote
    `expected_rewrites` places, and the output and every gradient against eager. Returns the report."""
    from tests.conftest import DEVICE

    module = module.to(DEVICE)
    x = x.to(DEVICE).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = module(x_ref)
    cotangent = torch.randn_like(expected)
    expected.backward(cotangent)
    expected_grads = [x_ref.grad] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)

    actual, report = compile_and_report(module, x, **options)
    actual.backward(cotangent)

    assert not report.failures, str(report)  # a pass that raised falls back silently but for a warning
    assert report.counts()[family] == expected_rewrites, str(report)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_close(actual, expected, dtype=x.dtype)
    # Eager low-precision autograd rounds every intermediate while the kernels' backward runs in fp32, so
    # single gradient elements can differ by more than an ulp there: compare those as a whole.
    for grad, expected_grad in zip([x.grad] + [p.grad for p in module.parameters()], expected_grads):
        assert (grad is None) == (expected_grad is None)
        if grad is None:
            continue
        if x.dtype == torch.float32:
            assert_close(grad, expected_grad, rtol=1e-4)
        else:
            assert_relative_error(grad, expected_grad, 1e-2)
    return report


def variants(report, family: str) -> list[str]:
    """The variants `family` rewrote, in graph order."""
    return [r.variant for r in report.rewrites if r.family == family]


def rewritten_graph(fn, *args, families=None):
    """The graph the rewrite families (all, or those named) make of `fn`'s Dynamo graph for `args`."""
    from liger_compile.passes import FAMILIES, run_passes

    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(*args)
    rewritten, _result = run_passes(captured[0], {name: FAMILIES[name] for name in families or FAMILIES})
    return rewritten.graph
