"""Shared test utilities: tolerances, comparisons, tiny models, compiling with a report."""

from __future__ import annotations

import torch

from liger_compile.report import collect

# (rtol, atol) against an eager PyTorch reference. bf16 carries 8 significant bits, and the Triton
# interpreter truncates when it rounds fp32 to bf16 (GPUs round to nearest), so bf16 allows a few ulps.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


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
