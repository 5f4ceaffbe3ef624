"""Safe failure: a pass that raises, or a Triton kernel that does not compile, costs its speed-up with a one-line
warning, never a run or a result; LIGER_COMPILE_STRICT=1 turns each warning into an error."""

import importlib
import logging

import pytest
import torch
from torch import nn
from triton.runtime.errors import OutOfResources

import liger_compile
from liger_compile import passes
from liger_compile.kernels import _launch
from liger_compile.kernels import norm as norm_kernels
from liger_compile.ops import _library
from liger_compile.ops.rms_norm import rms_norm_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report

backend = importlib.import_module("liger_compile.backend")  # the module, which `liger_compile.backend` is not
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not _launch.INTERPRETING,
                                   reason="the kernels run on a GPU or under TRITON_INTERPRET=1")


@pytest.fixture
def failing_rms_norm_kernel(monkeypatch):
    """The RMSNorm forward launcher raises as Triton does when a kernel needs more shared memory than there is."""
    calls = []

    def out_of_resources(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(norm_kernels, "rms_norm_forward", out_of_resources)
    monkeypatch.setattr(_library, "_FAILED_KERNELS", set())
    return calls


@needs_kernels
def test_a_kernel_that_fails_to_compile_falls_back_to_the_reference(failing_rms_norm_kernel, caplog):
    x, weight = torch.randn(4, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="liger_compile"):
        first = liger_compile.ops.rms_norm(x, weight, 1e-6)
        second = liger_compile.ops.rms_norm(x * 2, weight, 1e-6)
    assert_close(first, rms_norm_reference(x, weight, 1e-6)[0])
    assert_close(second, rms_norm_reference(x * 2, weight, 1e-6)[0])
    assert len(failing_rms_norm_kernel) == 1  # not retried: a failed compile would be, on every launch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["liger_compile: a kernel of liger::rms_norm_forward failed to compile (OutOfResources: out "
                        "of resource: shared memory, Required: 262144, Hardware limit: 232448. Reducing block sizes "
                        "or `num_stages` may help.); computing it with the PyTorch reference from now on"]


@needs_kernels
def test_strict_mode_raises_when_a_kernel_fails_to_compile(failing_rms_norm_kernel, monkeypatch):
    monkeypatch.setenv(_library.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match=r"liger::rms_norm_forward failed to compile .*LIGER_COMPILE_STRICT=1"):
        liger_compile.ops.rms_norm(torch.randn(4, 64, device=DEVICE), None, 1e-6)


def test_strict_mode_raises_when_a_pass_fails(monkeypatch):
    def broken(graph, record):
        raise RuntimeError("matcher bug")

    monkeypatch.setitem(passes.FAMILIES, "rms_norm", broken)
    monkeypatch.setenv(_library.STRICT_ENV, "1")
    module = nn.RMSNorm(64).to(DEVICE)
    with pytest.raises(Exception, match=r"the rms_norm rewrite failed \(RuntimeError: matcher bug\)"):
        compile_and_report(module, torch.randn(3, 64, device=DEVICE))


def test_a_graph_whose_kernels_do_not_compile_is_compiled_without_rewrites(monkeypatch, caplog):
    """Inductor compiles the kernels of traced liger ops with the graph; if Triton fails there, the graph is
    compiled again as Dynamo gave it."""
    compiled_graphs = []
    compile_rewritten = backend.compile_rewritten

    def compile_fails_on_liger_ops(gm, example_inputs, mode, config):
        liger_ops = [n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "liger"]
        compiled_graphs.append(len(liger_ops))
        if liger_ops:
            raise RuntimeError("Inductor failed") from OutOfResources(262144, 232448, "shared memory")
        return compile_rewritten(gm, example_inputs, mode, config)

    monkeypatch.setattr(backend, "compile_rewritten", compile_fails_on_liger_ops)
    module, x = nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64)).to(DEVICE), torch.randn(3, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="liger_compile"):
        out, report = compile_and_report(module, x)
    assert_close(out, module(x))
    assert compiled_graphs == [1, 0]
    assert report.counts()["rms_norm"] == 1  # what the passes did; the warning says it was not kept
    assert "a Triton kernel of the rms_norm rewrite(s) failed to compile (RuntimeError: Inductor failed)" in caplog.text

    monkeypatch.setenv(_library.STRICT_ENV, "1")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="LIGER_COMPILE_STRICT=1"):
        compile_and_report(module, x)


def test_other_compile_errors_are_not_hidden(monkeypatch):
    def broken_compile(gm, example_inputs, mode, config):
        raise ValueError("a bug of the compiler")

    monkeypatch.setattr(backend, "compile_rewritten", broken_compile)
    module = nn.RMSNorm(64).to(DEVICE)
    with pytest.raises(Exception, match="a bug of the compiler"):
        compile_and_report(module, torch.randn(3, 64, device=DEVICE))
