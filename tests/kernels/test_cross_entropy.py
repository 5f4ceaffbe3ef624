"""Cross-entropy Triton kernel against the PyTorch reference (interpreted on CPU, natively on GPU)."""

import pytest
import torch

from liger_compile.kernels import cross_entropy as kernels
from liger_compile.kernels._launch import INTERPRETING, can_launch
from liger_compile.ops.cross_entropy import (
    _class_weight_and_sum,
    cross_entropy_backward_reference,
    cross_entropy_reference,
)
from tests.conftest import DEVICE
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not can_launch(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

# A vocab inside one block, one that is not a multiple of the block, and (GPU) a Llama-3-size one.
SHAPES = [(5, 1000), (3, 4099)]
if DEVICE == "cuda":
    SHAPES += [(64, 128256), (2, 262144)]
OPTIONS = {
    "plain": dict(),
    "smoothing+weights": dict(label_smoothing=0.1, weighted=True),
    "z+softcap": dict(lse_square_scale=1e-3, softcap=20.0),
}


def run_kernel(logits, target, weight, mode, g=None, h=None, grad=None, lse=None, **options):
    n = logits.shape[0]
    out = {name: torch.empty(n, device=logits.device) for name in ("loss", "z")}
    lse = torch.empty(n, device=logits.device) if lse is None else lse
    class_weight, class_weight_sum = _class_weight_and_sum(weight)
    kernels.cross_entropy_rows(logits, target, class_weight, class_weight_sum, mode=mode, loss=out["loss"],
                               z=out["z"], lse=lse, grad=grad, g=g, h=h, ignore_index=-100,
                               label_smoothing=options.get("label_smoothing", 0.0),
                               z_scale=options.get("lse_square_scale", 0.0), softcap=options.get("softcap"))
    return out["loss"], out["z"], lse


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_stats_then_grad_match_reference(rows, cols, dtype, options):
    torch.manual_seed(rows + cols)
    logits = (torch.randn(rows, cols, device=DEVICE) * 4).to(dtype)
    target = torch.randint(0, cols, (rows,), device=DEVICE)
    target[1] = -100
    options = dict(options)
    weight = torch.rand(cols, device=DEVICE) + 0.5 if options.pop("weighted", False) else None
    loss, z, lse = run_kernel(logits, target, weight, "stats", **options)
    reference = dict(ignore_index=-100, label_smoothing=options.get("label_smoothing", 0.0),
                     lse_square_scale=options.get("lse_square_scale", 0.0), softcap=options.get("softcap"))
    loss_ref, z_ref, lse_ref = cross_entropy_reference(logits, target, weight, reduction="none", **reference)
    # The softcap rounds to bf16 three times, and the interpreter rounds by truncating (GPUs to nearest).
    tolerance = 2e-2 if INTERPRETING and dtype != torch.float32 and "softcap" in options else 1e-4
    assert_close(loss + z, loss_ref, torch.float32, rtol=tolerance, atol=tolerance)
    assert_close(lse, lse_ref, torch.float32, rtol=tolerance, atol=tolerance)

    g, h = torch.rand(rows, device=DEVICE), torch.rand(rows, device=DEVICE)
    grad = torch.full_like(logits, float("nan"))
    run_kernel(logits, target, weight, "grad", g=g, h=h, grad=grad, lse=lse, **options)
    expected = cross_entropy_backward_reference(g, h, logits, target, weight, lse_ref, **reference)
    assert_close(grad, expected, dtype, atol=tolerance if tolerance > 1e-4 else None)
    assert (grad[1] == 0).all(), "an ignored row gets no gradient"

    in_place = logits.clone()
    loss2, _, _ = run_kernel(in_place, target, weight, "stats_and_grad", g=g, h=h, grad=in_place, **options)
    # one pass or two: the same math (compilers may contract it into FMAs differently)
    assert_close(loss2, loss, torch.float32, rtol=1e-6, atol=1e-6)
    assert_close(in_place, grad, dtype, rtol=1e-5 if dtype == torch.float32 else None, atol=1e-7)


def test_extreme_logits_stay_finite():
    """Huge magnitudes (no overflow in exp) and -inf entries (masked vocab) give PyTorch's answer."""
    logits = torch.randn(4, 300, device=DEVICE) * 1e4
    logits[0, :150] = float("-inf")
    logits[2, 7] = float("-inf")
    target = torch.tensor([200, 3, 8, 299], device=DEVICE)
    loss, _, lse = run_kernel(logits, target, None, "stats")
    expected, _, _ = cross_entropy_reference(logits, target, None, -100, "none", 0.0, 0.0, None)
    assert torch.isfinite(loss).all()
    assert_close(loss, expected, rtol=1e-5, atol=1e-2)


def test_out_of_range_label_gives_nan_not_a_read_out_of_bounds():
    logits = torch.randn(2, 50, device=DEVICE)
    loss, _, _ = run_kernel(logits, torch.tensor([50, 1], device=DEVICE), None, "stats")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
