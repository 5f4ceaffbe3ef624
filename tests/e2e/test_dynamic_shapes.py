"""Dynamic shapes: a sequence length that changes every step compiles once (dynamic=True) or twice (automatic
dynamic: the first length static, then one graph for all), keeps every rewrite, and matches eager at each step."""

import copy
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, tiny_causal_lm

# The interpreter cannot run inside Inductor's CPU code, so the CPU suite compiles with aot_eager; on a GPU the
# kernels go through Inductor, symbolic sizes and all.
COMPILER = "inductor" if DEVICE == "cuda" else "aot_eager"
LENGTHS = (8, 12, 16, 20, 24)


@pytest.mark.parametrize("dynamic,graphs", [(None, 2), (True, 1)], ids=["automatic", "dynamic=True"])
def test_changing_sequence_length_does_not_recompile_per_length(dynamic, graphs):
    model = tiny_causal_lm("llama").to(DEVICE).train()
    reference = copy.deepcopy(model)
    compiled = liger_compile.optimize(model, dynamic=dynamic, compiler=COMPILER)
    generator = torch.Generator().manual_seed(0)
    counters.clear()
    with collect() as report:
        for length in LENGTHS:
            ids = torch.randint(0, 128, (2, length), generator=generator).to(DEVICE)
            loss = compiled(input_ids=ids, labels=ids).loss
            expected = reference(input_ids=ids, labels=ids).loss
            loss.backward()
            expected.backward()
            assert_close(loss, expected)
    assert counters["stats"]["unique_graphs"] == graphs
    for (name, param), expected_param in zip(model.named_parameters(), reference.parameters()):
        assert_close(param.grad, expected_param.grad, rtol=1e-4, atol=1e-5)  # summed over the five lengths
    # the graph serving the changing lengths is rewritten as a static one would be
    last = Counter(rewrite.family for rewrite in report.graphs[-1].rewrites)
    assert last == {"rms_norm": 5, "glu": 2, "rope": 2, "cross_entropy": 1, "embedding": 1}, str(report)
    assert not report.near_misses, str(report)
