"""Every causal LM in transformers that builds tiny offline: the liger backend matches eager, and rewrites
what was recorded for it (tests/models/expected_architectures.py, written by benchmarks/coverage.py).

The default run checks one architecture (the first in transformers' order) per combination seen in the sweep of
the families that rewrite something, near-misses or none, and one graph or several: every such combination in an
eighth of the sweep's time; ``LIGER_COMPILE_FULL_SWEEP=1`` checks them all (benchmarks/coverage.py always does)."""

import os

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tests.models.architectures import GRAD_TOLERANCE, LOSS_TOLERANCE, check, expectation
from tests.models.expected_architectures import EXPECTED, SECONDS, TRANSFORMERS_VERSION, UNBUILDABLE

pytestmark = pytest.mark.skipif(
    transformers.__version__ != TRANSFORMERS_VERSION,
    reason=f"expectations were recorded with transformers {TRANSFORMERS_VERSION}, "
           f"{transformers.__version__} is installed (the test extra pins it)",
)

FULL_SWEEP = os.environ.get("LIGER_COMPILE_FULL_SWEEP", "0") == "1"


def _kind(expected: dict[str, int]) -> tuple:
    families = tuple(sorted(name for name, count in expected.items() if count and name not in ("graphs", "near_misses")))
    return families, expected["near_misses"] > 0, expected["graphs"] > 1


def _representatives() -> set[str]:
    """The quickest architecture of each kind of recorded expectation (see `_kind`), by the sweep's SECONDS."""
    quickest: dict[tuple, str] = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type in EXPECTED:
            kind = _kind(EXPECTED[model_type])
            if kind not in quickest or SECONDS[model_type] < SECONDS[quickest[kind]]:
                quickest[kind] = model_type
    return set(quickest.values())


REPRESENTATIVES = _representatives()


@pytest.mark.parametrize("model_type", list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_architecture(model_type):
    if model_type in UNBUILDABLE:
        pytest.skip(f"cannot be built tiny offline: {UNBUILDABLE[model_type]}")
    if not FULL_SWEEP and model_type in EXPECTED and model_type not in REPRESENTATIVES:
        pytest.skip("same kind of expectation as a quicker architecture checked here; "
                    "LIGER_COMPILE_FULL_SWEEP=1 checks it")
    assert model_type in EXPECTED, f"no expectation recorded for {model_type}: run benchmarks/coverage.py"
    result = check(model_type)
    assert result.loss_error <= LOSS_TOLERANCE
    assert result.grad_error <= GRAD_TOLERANCE
    assert expectation(result) == EXPECTED[model_type], result.near_misses
