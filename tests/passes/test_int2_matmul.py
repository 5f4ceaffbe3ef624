"""The int2 × int8 matmul rewrite: each supported unpack-then-multiply spelling is rewritten once and exactly;
near-misses are left alone and reported.

On the CPU also in a GPU run: PyTorch has no int32 matmul on CUDA, so eager could not compute those spellings there
(the op's CUDA path is tested in tests/ops and tests/kernels)."""

import pytest
import torch
from torch import nn

from liger_compile.backend import rewrite
from liger_compile.config import resolve
from liger_compile.ops.int2_matmul import unpack_int2
from tests.helpers import compile_and_report
K, N = 36, 40
SHIFTS = (0, 2, 4, 6)


def shift_then_mask(p):
    return [(p >> s) & 3 for s in SHIFTS]


def mask_then_shift(p):
    return [(p & (3 << s)) >> s for s in SHIFTS]


def torch_functions(p):
    return [torch.bitwise_and(torch.bitwise_right_shift(p, s), 3) for s in SHIFTS]


def methods(p):
    return [p.bitwise_right_shift(s).bitwise_and(3) for s in SHIFTS]


def bare_ends(p):  # no shift for the lowest field, no mask for the top one (uint8)
    return [p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6]


def cast_then_offset(fields, dim=0):
    return torch.cat(fields, dim=dim).to(torch.int8) - 1


def offset_then_cast(fields, dim=0):
    return (torch.cat(fields, dim) - 1).to(torch.int8)  # uint8: 0 - 1 wraps to 255, which int8 reads as -1


def int_mm(x, w):
    return torch._int_mm(x, w)


def matmul_int32(x, w):
    return x.int() @ w.int()


def torch_matmul_int32(x, w):
    return torch.matmul(x.to(torch.int32), w.to(torch.int32))


def mm_method_int32(x, w):
    return x.to(torch.int32).mm(w.to(dtype=torch.int32))


class TernaryLinear(nn.Module):
    """multiply(x, combine(fields(packed))) over a registered packed buffer: BitNet inference code's shape."""

    def __init__(self, fields, combine, multiply, packed_dtype=torch.uint8):
        super().__init__()
        self.fields, self.combine, self.multiply = fields, combine, multiply
        generator = torch.Generator().manual_seed(0)  # every byte value: invalid code 3 included
        packed = torch.randint(0, 256, (K // 4, N), dtype=torch.uint8, generator=generator).view(packed_dtype)
        self.register_buffer("packed", packed)

    def forward(self, x):
        return self.multiply(x, self.combine(self.fields(self.packed)))


def activations(rows=17, dtype=torch.int8):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(-128, 128, (rows, K), generator=generator).to(dtype)


def compile_module(module, x, **options):
    expected = module(x)
    actual, report = compile_and_report(module, x, **options)
    assert report.failures == [], str(report)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    return report


SPELLINGS = {
    "int_mm": (shift_then_mask, cast_then_offset, int_mm, "int_mm"),
    "int_mm_offset_then_cast": (shift_then_mask, offset_then_cast, int_mm, "int_mm"),
    "matmul_operator": (mask_then_shift, offset_then_cast, matmul_int32, "matmul int32"),
    "torch_functions": (torch_functions, lambda f: cast_then_offset(f, dim=-2), torch_matmul_int32, "matmul int32"),
    "methods": (methods, cast_then_offset, mm_method_int32, "matmul int32"),
    "bare_ends": (bare_ends, offset_then_cast, int_mm, "int_mm"),
    "unpack_int2": (lambda p: p, unpack_int2, int_mm, "int_mm"),  # the library's own, traced into the graph
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_rewritten_once(spelling):
    fields, combine, multiply, variant = SPELLINGS[spelling]
    report = compile_module(TernaryLinear(fields, combine, multiply), activations())
    assert report.counts()["int2_matmul"] == 1, str(report)
    assert [r.variant for r in report.rewrites] == [variant]
    assert report.near_misses == []


def test_int8_packed_tensor_with_shift_then_mask():
    """int8 storage: arithmetic shifts copy the sign bit, which the mask then drops."""
    module = TernaryLinear(shift_then_mask, lambda f: torch.cat(f) - 1, matmul_int32, packed_dtype=torch.int8)
    report = compile_module(module, activations())
    assert report.counts()["int2_matmul"] == 1, str(report)


def test_leading_dims_of_activations():
    module = TernaryLinear(shift_then_mask, cast_then_offset, matmul_int32)
    report = compile_module(module, activations(6).view(2, 3, K))
    assert report.counts()["int2_matmul"] == 1, str(report)


def test_rewritten_graph_calls_only_the_op():
    """The unpacking nodes go with the matmul: only the op is left to compute."""
    module = TernaryLinear(shift_then_mask, cast_then_offset, int_mm)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(module, backend=capture)(activations())
    rewritten, result = rewrite(graphs[0], resolve({"int2_matmul": True}))
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.liger.matmul_int2_int8.default], targets
    assert len(result.rewrites) == 1


def reversed_fields(p):
    return shift_then_mask(p)[::-1]


NEAR_MISSES = {
    "reversed_order": (reversed_fields, cast_then_offset, int_mm, "in the order [3, 2, 1, 0]"),
    "shift_of_another_field": (lambda p: [(p & (3 << s)) >> (s and 2) for s in SHIFTS], cast_then_offset, int_mm,
                               "the mask does not select"),
    "mask_of_7": (lambda p: [(p >> s) & 7 for s in SHIFTS], cast_then_offset, int_mm, "the mask does not select"),
    "offset_of_2": (shift_then_mask, lambda f: torch.cat(f).to(torch.int8) - 2, int_mm, "offset by 2, not 1"),
    "cat_along_n": (shift_then_mask, lambda f: cast_then_offset(f, dim=1), lambda x, w: matmul_int32(x[:, :K // 4], w),
                    "concatenated along dim 1"),
    "float_matmul": (shift_then_mask, cast_then_offset, lambda x, w: x.float() @ w.float(),
                     "multiplied in torch.float32"),
    "weights_used_twice": (shift_then_mask, cast_then_offset, lambda x, w: torch._int_mm(x, w) + w.sum(),
                           "also used elsewhere"),
    "int32_weights_used_twice": (shift_then_mask, cast_then_offset,
                                 lambda x, w: (lambda w32: x.int() @ w32 + w32.sum())(w.int()), "also used elsewhere"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_are_left_alone_and_reported(case):
    fields, combine, multiply, reason = NEAR_MISSES[case]
    report = compile_module(TernaryLinear(fields, combine, multiply), activations())
    assert report.counts()["int2_matmul"] == 0, str(report)
    assert [m.family for m in report.near_misses] == ["int2_matmul"], str(report)
    assert reason in report.near_misses[0].reason, str(report)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_activations_not_int8_are_a_near_miss(dtype):
    module = TernaryLinear(shift_then_mask, cast_then_offset, matmul_int32)
    report = compile_module(module, activations(dtype=dtype))
    assert report.counts()["int2_matmul"] == 0
    assert f"the activations are {dtype}" in report.near_misses[0].reason


def test_top_field_of_int8_mask_then_shift_is_a_near_miss():
    """(p & 192) >> 6 of an int8 p shifts the sign in: codes -2 and -1, not 2 and 3."""
    module = TernaryLinear(mask_then_shift, lambda f: torch.cat(f) - 1, int_mm, packed_dtype=torch.int8)
    report = compile_module(module, activations())
    assert report.counts()["int2_matmul"] == 0
    assert "arithmetic shift copies the sign" in report.near_misses[0].reason


class UnpackedOnce(nn.Module):
    """Weights unpacked before compiling: nothing in the graph to rewrite."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weights", unpack_int2(torch.randint(0, 256, (K // 4, N), dtype=torch.uint8)))

    def forward(self, x):
        return torch._int_mm(x, self.weights) + matmul_int32(x, self.weights)


def test_other_integer_matmuls_are_not_matched():
    report = compile_module(UnpackedOnce(), activations())
    assert report.counts()["int2_matmul"] == 0 and report.near_misses == []


def test_on_by_default_and_switchable():
    module = TernaryLinear(shift_then_mask, cast_then_offset, int_mm)
    assert compile_module(module, activations()).counts()["int2_matmul"] == 1
    report = compile_module(module, activations(), int2_matmul=False)
    assert report.counts()["int2_matmul"] == 0 and report.near_misses == []
