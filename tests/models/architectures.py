"""Every causal LM in transformers, built tiny and offline, checked against eager under the liger backend.

`tiny_config(model_type)` makes a 2-layer config with small hidden size, heads, vocabulary and experts, dropout
off; `check(model_type)` trains one step compiled with the backend next to eager and returns what it saw.
tests/models/test_architectures.py asserts on it for every architecture; benchmarks/coverage.py writes the
same results to docs/coverage.md and the expectations to tests/models/expected_architectures.py.

The compiler after the rewrites is "eager" (the rewritten graph runs as is, the liger ops with their
registered autograd): what this sweep checks is the rewrites on 150 kinds of graphs, quickly; AOTAutograd's
tracing of the ops is covered by the op, model and end-to-end tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tests.helpers import compile_and_report

# Passed to the config's constructor, so aliases (`n_embd`, `d_model`) and derived fields follow.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1,
    n_group=1, topk_group=1,
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8,
    # encoder-decoder and speech configs size each side separately
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, d_inner=128,
)
# Per-layer settings sized for the original depth: rebuilt sub-configs derive them again for 2 layers.
_PER_LAYER = ("layer_types", "per_layer_config")
VOCAB = TINY["vocab_size"]
MAX_PARAMETERS = 20_000_000  # a config that stays bigger than this after shrinking is not tiny: not built
BATCH, SEQ = 2, 16


def _configs(config):
    """`config` and every sub-config in it (text_config, vision_config, ...)."""
    from transformers import PretrainedConfig

    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _configs(value)


def _own_sizes(config_class, sizes: dict) -> dict:
    """The entries of `sizes` that `config_class` has as one global, settable value (directly or through its
    attribute_map). Left alone: per-layer attributes, which configs refuse to read globally, and those a
    config refuses to take (read-only properties, sizes it derives itself)."""
    defaults = config_class()

    def accepts(name: str, value) -> bool:
        try:
            getattr(defaults, name)
            config_class(**{name: value})
            return True
        except Exception:  # AttributeError, NotImplementedError, transformers' validation errors
            return False

    return {name: value for name, value in sizes.items() if accepts(name, value)}


def _shrink_subconfigs(config, sizes: dict) -> None:
    """Rebuild sub-configs (a multimodal model's text and vision configs) with the tiny sizes too."""
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            settings = {k: v for k, v in value.to_dict().items() if k not in _PER_LAYER}
            rebuilt = type(value).from_dict({**settings, **_own_sizes(type(value), sizes)})
            _shrink_subconfigs(rebuilt, sizes)
            setattr(config, name, rebuilt)


def tiny_config(model_type: str, **overrides):
    """A tiny config of `model_type`; `overrides` replace TINY's sizes (e.g. num_hidden_layers=4)."""
    from transformers import CONFIG_MAPPING

    sizes = {**TINY, **overrides}
    config_class = CONFIG_MAPPING[model_type]
    config = config_class(**_own_sizes(config_class, sizes))
    _shrink_subconfigs(config, sizes)
    for sub in _configs(config):
        if getattr(sub, "kv_lora_rank", None):  # multi-head latent attention: as many k/v heads as queries,
            sub.num_key_value_heads = sub.num_attention_heads  # and rotary on qk_rope_head_dim dims
            sub.head_dim = sub.qk_rope_head_dim
        for name, value in list(vars(sub).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(sub, name, 0.0)
            elif name.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
                setattr(sub, name, VOCAB - 1)
        sub.use_cache = False
    return config


class Unbuildable(Exception):
    """The architecture cannot be built tiny and offline; the message says why."""


# Built tiny, but Dynamo itself spends many minutes tracing them on CPU: left out of the sweep's time budget.
TOO_SLOW_TO_TRACE = {
    "zamba": "Dynamo was still tracing its Mamba layers after 8 minutes (tracing comes before any backend runs)",
}


def build(model_type: str, **overrides) -> torch.nn.Module:
    """The tiny model in train mode, seeded weights; raises Unbuildable with the reason if it cannot be."""
    from transformers import AutoModelForCausalLM

    if model_type in TOO_SLOW_TO_TRACE:
        raise Unbuildable(TOO_SLOW_TO_TRACE[model_type])
    try:
        config = tiny_config(model_type, **overrides)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as error:
        raise Unbuildable(f"config: {type(error).__name__}: {str(error).splitlines()[0][:160]}") from error
    if parameters > MAX_PARAMETERS:
        raise Unbuildable(f"{parameters / 1e6:.0f}M parameters after shrinking the config")
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config).train()
    except Exception as error:
        raise Unbuildable(f"build: {type(error).__name__}: {str(error).splitlines()[0][:160]}") from error


LOSS_TOLERANCE = 1e-4  # |compiled - eager| of a loss near log(128) = 4.85, in fp32
GRAD_TOLERANCE = 1e-3  # gradient error relative to each parameter's largest gradient
# Below this loss a model predicts every label with certainty (XLNet's head sees its own label): each logit's
# gradient p - 1 is fp32 rounding noise, which any two cross-entropy implementations round differently.
SATURATED_LOSS = 1e-5


@dataclass
class Result:
    model_type: str
    graphs: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    near_misses: list[str] = field(default_factory=list)
    loss_error: float = 0.0  # |compiled - eager| loss
    grad_error: float = 0.0  # max over parameters of the max |compiled - eager| gradient, relative to its scale


def training_step(model, ids):
    """The model's output (with its loss) on `ids` as input and labels."""
    return model(input_ids=ids, labels=ids)


def step_inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _raise_if_dynamo_fails_too(model, ids, error: Exception) -> None:
    """After the backend failed on `model`: Unbuildable if plain Dynamo fails as well (not ours to fix)."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda i: training_step(model, i), backend="eager")(ids).loss.backward()
    except Exception as plain_error:
        raise Unbuildable(f"torch.compile itself fails: {type(plain_error).__name__}: "
                          f"{str(plain_error).splitlines()[0][:160]}") from error


def check(model_type: str, compiler: str = "eager") -> Result:
    """One training step with the liger backend next to eager from the same weights.

    Raises `Unbuildable` when the architecture cannot be built tiny or does not train eagerly with these
    inputs (then there is nothing to compare against).
    """
    model = build(model_type)
    reference = copy.deepcopy(model)
    # Another architecture compiled earlier with another eps would make Dynamo treat eps as dynamic.
    torch._dynamo.reset()
    ids = step_inputs()
    try:
        expected = training_step(reference, ids).loss
        expected.backward()
    except Exception as error:
        raise Unbuildable(f"eager step: {type(error).__name__}: {str(error).splitlines()[0][:160]}") from error
    try:
        output, report = compile_and_report(lambda i: training_step(model, i), ids, compiler=compiler)
        output.loss.backward()
    except Exception as error:
        _raise_if_dynamo_fails_too(reference, ids, error)
        raise
    grad_error = 0.0
    compare_gradients = expected.item() > SATURATED_LOSS
    for param, ref_param in zip(model.parameters(), reference.parameters()):
        if (param.grad is None) != (ref_param.grad is None):
            raise AssertionError(f"{model_type}: a parameter gets a gradient in only one of eager and compiled")
        if param.grad is not None and compare_gradients:
            scale = ref_param.grad.abs().max().clamp_min(1e-6)
            grad_error = max(grad_error, ((param.grad - ref_param.grad).abs().max() / scale).item())
    if report.failures:
        raise AssertionError(f"{model_type}: rewrite passes failed: {[f.error for f in report.failures]}")
    return Result(model_type, len(report.graphs), report.counts(), [f"{m.location}: {m.reason}" for m in
                  report.near_misses], abs(output.loss - expected).item(), grad_error)


def expectation(result: Result) -> dict[str, int]:
    """What tests/models/expected_architectures.py records of a result."""
    return {"graphs": result.graphs, **result.counts, "near_misses": len(result.near_misses)}
