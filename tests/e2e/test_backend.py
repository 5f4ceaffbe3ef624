"""The backend as users call it: registration, options, environment, fallback, optimize, explain, logging."""

import logging

import pytest
import torch
from torch import nn

import liger_compile
from liger_compile import passes
from liger_compile.backend import liger_backend
from liger_compile.config import ENV_DISABLE, resolve
from tests.conftest import DEVICE
from tests.helpers import assert_close, compile_and_report


def rms_norm_module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64, eps=1e-6)).to(DEVICE)


def test_backend_is_registered_under_its_name():
    assert "liger" in torch._dynamo.list_backends()


def test_compile_with_inductor_as_documented():
    """The issue's acceptance line: torch.compile(torch.nn.RMSNorm(64), backend='liger') runs."""
    norm = torch.nn.RMSNorm(64).to(DEVICE)
    x = torch.randn(2, 64, device=DEVICE)
    with liger_compile.report.collect() as report:
        y = torch.compile(norm, backend="liger")(x)
    assert report.counts()["rms_norm"] == 1
    assert_close(y, norm(x))


def test_a_family_can_be_switched_off_by_option():
    module, x = rms_norm_module(), torch.randn(3, 64, device=DEVICE)
    out, report = compile_and_report(module, x, rms_norm=False)
    assert report.counts()["rms_norm"] == 0
    assert_close(out, module(x))


@pytest.mark.parametrize("value", ["rms_norm", "all", " rms_norm , "])
def test_environment_disables_families(monkeypatch, value):
    monkeypatch.setenv(ENV_DISABLE, value)
    module, x = rms_norm_module(), torch.randn(3, 64, device=DEVICE)
    _, report = compile_and_report(module, x)
    assert report.counts()["rms_norm"] == 0


@pytest.mark.parametrize("options,message", [
    ({"rms_nrom": False}, "unknown options \\['rms_nrom'\\]"),
    ({"compiler": "tvm"}, "compiler must be one of"),
    ({"compiler": "aot_eager", "max_autotune": True}, "Inductor options \\['max_autotune'\\] given with"),
])
def test_bad_options_are_refused_with_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        resolve(options)
    with pytest.raises(ValueError, match=message):
        liger_compile.optimize(nn.Linear(2, 2), **options)


def test_unknown_family_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE, "rms_norm,swiglue")
    with pytest.raises(ValueError, match="unknown rewrite families \\['swiglue'\\]"):
        resolve({})


def test_inductor_options_pass_through():
    config = resolve({"rms_norm": True, "max_autotune": True})
    assert config.families == ("layer_norm", "rms_norm", "glu", "rope", "attention", "cross_entropy", "divergence",
                               "embedding", "int2_matmul")
    assert config.inductor_options == {"max_autotune": True}


def test_mode_needs_inductor():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode='reduce-overhead' needs compiler='inductor'"):
        liger_backend(gm, [torch.randn(1, 2)], mode="reduce-overhead", options={"compiler": "aot_eager"})


def test_a_failing_pass_falls_back_with_a_warning(monkeypatch, caplog):
    def broken(graph, record):
        raise RuntimeError("matcher bug")

    monkeypatch.setitem(passes.FAMILIES, "rms_norm", broken)
    module, x = rms_norm_module(), torch.randn(3, 64, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="liger_compile"):
        out, report = compile_and_report(module, x)
    assert_close(out, module(x))
    assert report.counts()["rms_norm"] == 0
    assert [(f.family, f.error) for f in report.failures] == [("rms_norm", "RuntimeError: matcher bug")]
    assert "the rms_norm rewrite failed (RuntimeError: matcher bug)" in caplog.text


def test_passes_work_on_a_clone_and_leave_the_dynamo_graph_untouched():
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    module = rms_norm_module()
    torch.compile(module, backend=capture)(torch.randn(3, 64, device=DEVICE))
    original = captured[0]
    before = original.code
    rewritten, result = passes.run_passes(original, passes.FAMILIES)
    assert original.code == before
    assert len(result.rewrites) == 1 and rewritten is not original
    assert "liger.rms_norm" in rewritten.code


def test_optimize_and_explain():
    module, x = rms_norm_module(), torch.randn(3, 64, device=DEVICE, requires_grad=True)
    compiled = liger_compile.optimize(module, compiler="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert_close(out, module(x))

    report = liger_compile.explain(compiled, x)
    assert report.counts() == {"layer_norm": 0, "rms_norm": 1, "residual_norm": 0, "glu": 0, "rope": 0,
                               "attention": 0, "cross_entropy": 0, "divergence": 0, "embedding": 0,
                               "int2_matmul": 0}
    summary = report.to_dict()
    assert summary["counts"] == report.counts() and summary["near_misses"] == []
    assert summary["rewrites"][0]["variant"] == "torch.rms_norm"
    text = str(report)
    assert "rms_norm                 1            0" in text and "rewrites:" in text


def test_report_is_logged_at_info(caplog):
    module, x = rms_norm_module(), torch.randn(3, 64, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="liger_compile"):
        compile_and_report(module, x)
    assert "liger-compile: 1 graph(s)" in caplog.text
