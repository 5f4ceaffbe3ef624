"""torch.ops.liger.matmul_int2_int8, pack_int2 / unpack_int2 and Int2Linear: exactness against the int32
reference, opcheck, errors, torch.compile."""

import pytest
import torch
from torch.library import opcheck

from liger_compile.nn import Int2Linear
from liger_compile.ops import LigerOpError, matmul_int2_int8, pack_int2, unpack_int2
from tests.conftest import DEVICE


def ternary(k: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=generator)


def activations(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator).to(DEVICE)


def exact_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.cpu().to(torch.int32) @ w.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float32])
def test_pack_unpack_round_trip(dtype):
    w = ternary(12, 5).to(dtype)
    packed = pack_int2(w)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(unpack_int2(packed), w.to(torch.int8))
    assert torch.equal(unpack_int2(packed.view(torch.int8)), w.to(torch.int8))


def test_packing_layout():
    """Bits 2j..2j+1 of packed[p, n] hold w[j * K // 4 + p, n] + 1."""
    w = torch.zeros(8, 1, dtype=torch.int8)
    w[[0, 2, 4, 6], 0] = torch.tensor([1, -1, 1, 1], dtype=torch.int8)  # row p = 0 of each quarter
    assert pack_int2(w).tolist() == [[2 | 0 << 2 | 2 << 4 | 2 << 6], [0b01010101]]


@pytest.mark.parametrize("x_shape", [(7, 36), (2, 3, 36), (36,)], ids=["2d", "leading_dims", "1d"])
@pytest.mark.parametrize("packed_dtype", [torch.uint8, torch.int8])
def test_op_matches_exact_product(op_path, x_shape, packed_dtype):
    w = ternary(36, 40, seed=1)
    x = activations(*x_shape)
    y = matmul_int2_int8(x, pack_int2(w).view(packed_dtype).to(DEVICE))
    assert y.dtype == torch.int32 and y.shape == (*x_shape[:-1], 40)
    assert torch.equal(y.cpu(), exact_product(x, w))


def test_every_byte_value_unpacks_as_the_reference(op_path):
    """Random bytes hold code 3 too (invalid: unpacks to 2); kernel and reference agree on it as well."""
    packed = torch.randint(0, 256, (33, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    x = activations(9, 132, seed=5)
    assert torch.equal(matmul_int2_int8(x, packed.to(DEVICE)).cpu(), exact_product(x, unpack_int2(packed)))


def test_opcheck(op_path):
    x, packed = activations(2, 3, 36), pack_int2(ternary(36, 8)).to(DEVICE)
    opcheck(torch.ops.liger.matmul_int2_int8.default, (x, packed))


def test_compiled_with_the_backend(op_path):
    w = ternary(36, 40, seed=2)
    packed, x = pack_int2(w).to(DEVICE), activations(5, 36)
    fn = torch.compile(lambda x, packed: matmul_int2_int8(x, packed) * 2, backend="liger", fullgraph=True,
                       options={"compiler": "aot_eager"})
    assert torch.equal(fn(x, packed).cpu(), exact_product(x, w) * 2)


@pytest.mark.parametrize("call,message", [
    (lambda: matmul_int2_int8(torch.ones(2, 8), torch.ones(2, 3, dtype=torch.uint8)), "x must be int8"),
    (lambda: matmul_int2_int8(torch.ones(2, 8, dtype=torch.int8), torch.ones(2, 3, dtype=torch.int32)),
     "w_packed must be uint8"),
    (lambda: matmul_int2_int8(torch.ones(2, 8, dtype=torch.int8), torch.ones(2, 3, 1, dtype=torch.uint8)),
     "w_packed must be 2-D"),
    (lambda: matmul_int2_int8(torch.ones(2, 6, dtype=torch.int8), torch.ones(2, 3, dtype=torch.uint8)),
     r"x's last dim K must be 4 \* w_packed.shape\[0\], got x \(2, 6\) and w_packed \(2, 3\)"),
    (lambda: matmul_int2_int8(torch.ones((), dtype=torch.int8), torch.ones(2, 3, dtype=torch.uint8)),
     "x must have at least one dim"),
])
def test_bad_input_names_the_op(call, message):
    with pytest.raises(LigerOpError, match=f"liger::matmul_int2_int8: {message}"):
        call()


def test_mismatched_devices_are_named():
    if DEVICE == "cpu":
        pytest.skip("needs a second device")
    with pytest.raises(LigerOpError, match="liger::matmul_int2_int8: all tensors must be on one device"):
        matmul_int2_int8(torch.ones(2, 8, dtype=torch.int8, device=DEVICE), torch.ones(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("w,message", [
    (torch.zeros(8), "w must be 2-D"),
    (torch.zeros(6, 2), "K must be a multiple of 4"),
    (torch.full((4, 2), 2), "values must be -1, 0 or 1, got 2"),
    (torch.full((4, 2), 0.5), "values must be -1, 0 or 1, got 0.5"),
])
def test_pack_rejects_what_it_cannot_pack(w, message):
    with pytest.raises(ValueError, match=f"pack_int2: .*{message}"):
        pack_int2(w)


def test_unpack_rejects_other_tensors():
    with pytest.raises(ValueError, match="unpack_int2: w_packed must be a 2-D uint8 or int8 tensor"):
        unpack_int2(torch.zeros(2, 3, dtype=torch.int32))


def bitnet_reference(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 inference in float64: absmax int8 activations per row, absmean ternary weights."""
    w, x = linear.weight.double(), x.double()
    weight_scale = w.abs().mean().clamp_min(1e-5)
    w_ternary = (w / weight_scale).round().clamp(-1, 1)
    scale = 127 / x.abs().amax(-1, keepdim=True).clamp_min(1e-5)
    x_quantized = (x * scale).round().clamp(-128, 127)
    return (x_quantized @ w_ternary.t()) / scale * weight_scale + linear.bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int2_linear_from_linear(op_path, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(36, 10).to(DEVICE)
    x = torch.randn(2, 3, 36, device=DEVICE).to(dtype)
    layer = Int2Linear.from_linear(linear)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 10)
    assert layer.weight_packed.shape == (9, 10) and layer.weight_packed.dtype == torch.uint8
    expected = bitnet_reference(linear, x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


def test_int2_linear_without_bias_and_zero_init():
    layer = Int2Linear(8, 3, bias=False).to(DEVICE)
    assert torch.equal(layer(torch.randn(4, 8, device=DEVICE)), torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="in_features must be a multiple of 4"):
        Int2Linear(6, 3)


def test_int2_linear_compiles_to_the_same_output(op_path):
    torch.manual_seed(1)
    layer = Int2Linear.from_linear(torch.nn.Linear(36, 10).to(DEVICE))
    x = torch.randn(3, 36, device=DEVICE)
    compiled = torch.compile(layer, backend="liger", fullgraph=True, options={"compiler": "aot_eager"})
    torch.testing.assert_close(compiled(x), layer(x))
