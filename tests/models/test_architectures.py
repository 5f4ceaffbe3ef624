"""Every causal LM in transformers that builds tiny offline: the liger backend matches eager, and rewrites
what was recorded for it (tests/models/expected_architectures.py, written by benchmarks/coverage.py)."""

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tests.models.architectures import GRAD_TOLERANCE, LOSS_TOLERANCE, check, expectation
from tests.models.expected_architectures import EXPECTED, TRANSFORMERS_VERSION, UNBUILDABLE

pytestmark = pytest.mark.skipif(
    transformers.__version__ != TRANSFORMERS_VERSION,
    reason=f"expectations were recorded with transformers {TRANSFORMERS_VERSION}, "
           f"{transformers.__version__} is installed (the test extra pins it)",
)


@pytest.mark.parametrize("model_type", list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_architecture(model_type):
    if model_type in UNBUILDABLE:
        pytest.skip(f"cannot be built tiny offline: {UNBUILDABLE[model_type]}")
    assert model_type in EXPECTED, f"no expectation recorded for {model_type}: run benchmarks/coverage.py"
    result = check(model_type)
    assert result.loss_error <= LOSS_TOLERANCE
    assert result.grad_error <= GRAD_TOLERANCE
    assert expectation(result) == EXPECTED[model_type], result.near_misses
