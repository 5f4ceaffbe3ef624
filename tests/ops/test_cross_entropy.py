"""torch.ops.liger.cross_entropy: forward and backward against autograd of F.cross_entropy for every option,
opcheck, ignored rows, errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from liger_compile.ops import LigerOpError, cross_entropy
from tests.conftest import DEVICE
from tests.helpers import assert_close


def eager_loss(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               lse_square_scale=0.0, softcap=None):
    """What a model computes: optional softcap in the logits' dtype, then F.cross_entropy in fp32, plus z-loss."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    x = logits.float()
    loss = F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if lse_square_scale:
        valid = target != ignore_index
        z = lse_square_scale * torch.logsumexp(x, -1) ** 2 * valid
        loss = loss + {"none": z, "sum": z.sum(), "mean": z.sum() / valid.sum()}[reduction]
    return loss


def make_inputs(rows, classes, dtype, seed=0, ignored=(1,)):
    torch.manual_seed(seed)
    logits = (torch.randn(rows, classes, device=DEVICE) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), device=DEVICE)
    for row in ignored:
        target[row] = -100
    return logits, target


def compare(logits, target, **options):
    loss = cross_entropy(logits, target, **options)
    expected_logits = logits.detach().clone().requires_grad_()
    expected = eager_loss(expected_logits, target, **options)
    cotangent = torch.rand_like(expected)
    (grad,) = torch.autograd.grad(loss, logits, cotangent)
    (expected_grad,) = torch.autograd.grad(expected, expected_logits, cotangent)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert_close(grad, expected_grad, logits.dtype)


OPTION_GRID = [
    dict(reduction=r, label_smoothing=s, weighted=w)
    for r, s, w in itertools.product(("mean", "sum", "none"), (0.0, 0.1), (False, True))
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_combination_matches_eager(op_path, options):
    options = dict(options)
    logits, target = make_inputs(6, 333, torch.float32)
    if options.pop("weighted"):
        options["weight"] = torch.rand(333, device=DEVICE) + 0.1
    compare(logits, target, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 1000), (3, 4099)], ids=["V1000", "V4099"])
def test_z_loss_softcap_and_dtypes(op_path, dtype, shape):
    logits, target = make_inputs(*shape, dtype)
    compare(logits, target, lse_square_scale=1e-4)
    if dtype == torch.float32 or DEVICE == "cuda":  # the interpreter truncates bf16 in the softcap's roundings
        compare(logits, torch.where(target == -100, 5, target), softcap=30.0, ignore_index=5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored_gives_pytorchs_answer(op_path, reduction):
    logits, target = make_inputs(3, 100, torch.float32, ignored=(0, 1, 2))
    loss = cross_entropy(logits, target, reduction=reduction)
    expected = F.cross_entropy(logits.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: 0/0 = NaN, as in PyTorch
    loss.sum().backward()
    assert (logits.grad == 0).all()


def test_z_loss_is_returned_for_logging(op_path):
    logits, target = make_inputs(5, 64, torch.float32)
    loss, z_loss = cross_entropy(logits, target, lse_square_scale=1e-2, return_z_loss=True)
    plain = cross_entropy(logits, target)
    assert_close(loss - plain, z_loss, rtol=1e-5, atol=1e-6)
    assert not z_loss.requires_grad


def test_opcheck(op_path):
    logits, target = make_inputs(4, 70, torch.float32)
    weight = torch.rand(70, device=DEVICE)
    for args in [(logits, target, None, -100, "mean", 0.0, 0.0, None),
                 (logits, torch.where(target == -100, 3, target), weight, 3, "none", 0.1, 1e-3, 10.0)]:
        opcheck(torch.ops.liger.cross_entropy_forward.default, args)


@pytest.mark.parametrize("make_args,message", [
    (lambda l, t: (l, torch.tensor([0, 1, 70, 3], device=DEVICE)), r"labels must be in \[0, 70\).*\[70\]"),
    (lambda l, t: (l, t.float()), "class indices"),
    (lambda l, t: (l[:, None], t), "must be 2-D"),
    (lambda l, t: (l, t[:3]), r"shape \(4,\)"),
], ids=["label out of range", "probabilities", "3-D logits", "short target"])
def test_bad_input_gets_a_clear_error(op_path, make_args, message):
    logits, target = make_inputs(4, 70, torch.float32)
    with pytest.raises(LigerOpError, match=f"liger::cross_entropy: .*{message}"):
        cross_entropy(*make_args(logits, target))


@pytest.mark.parametrize("options,message", [
    (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(softcap=0.0), "softcap"), (dict(lse_square_scale=-1.0), "lse_square_scale"),
])
def test_bad_options_are_refused(options, message):
    logits, target = make_inputs(2, 10, torch.float32, ignored=())
    with pytest.raises(LigerOpError, match=message):
        cross_entropy(logits, target, **options)
