"""The int8 × int2 matmul Triton kernel against the exact int32 reference (interpreted on CPU, natively on GPU)."""

import pytest
import torch

from liger_compile.kernels import int2_matmul as kernels
from liger_compile.kernels._launch import can_launch
from liger_compile.ops.int2_matmul import matmul_int2_int8_reference, pack_int2
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# K // 4 of 1, 9 and 33 packed rows: one partial block, and several blocks with a partial last one; M and N
# below, at and above one tile.
SHAPES = [(1, 4, 5), (7, 36, 40), (33, 132, 5), (33, 132, 40)]
if DEVICE == "cuda":
    SHAPES += [(4099, 4096, 1000), (130, 14336, 257)]


def random_packed(k: int, n: int, seed: int) -> torch.Tensor:
    """Every byte value: code 3 (invalid, unpacks to 2) included, which the kernel must unpack as the reference."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (k // 4, n), dtype=torch.uint8, generator=generator).to(DEVICE)


def run(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0], packed.shape[1]), -7, dtype=torch.int32, device=DEVICE)  # catches unwritten tiles
    kernels.int2_matmul(x, packed, out)
    return out


def check(x: torch.Tensor, packed: torch.Tensor) -> None:
    assert torch.equal(run(x, packed), matmul_int2_int8_reference(x, packed))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_reference_bit_exactly(m, k, n):
    torch.manual_seed(m * k + n)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE)
    check(x, random_packed(k, n, seed=n))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_activations(layout):
    torch.manual_seed(1)
    if layout == "transposed":  # unit stride along M, not K (which spans several blocks of packed rows)
        x = torch.randint(-128, 128, (132, 7), dtype=torch.int8, device=DEVICE).t()
    else:  # rows further apart than K
        x = torch.randint(-128, 128, (7, 150), dtype=torch.int8, device=DEVICE)[:, 3:135]
    check(x, random_packed(132, 40, seed=2))


def test_strided_packed_weights():
    packed = random_packed(36, 33, seed=3).t()  # (33, 9), unit stride along K // 4
    x = torch.randint(-128, 128, (5, 132), dtype=torch.int8, device=DEVICE)
    check(x, packed)


@pytest.mark.parametrize("x_value", [-128, 127])
@pytest.mark.parametrize("w_value", [-1, 1])
def test_extreme_values(x_value, w_value):
    """The largest sums there are (128 * K): nothing wraps, and every packed row and quarter of K counts."""
    x = torch.full((17, 132), x_value, dtype=torch.int8, device=DEVICE)
    packed = pack_int2(torch.full((132, 40), w_value, dtype=torch.int8)).to(DEVICE)
    assert torch.equal(run(x, packed), torch.full((17, 40), x_value * w_value * 132, dtype=torch.int32, device=DEVICE))
