"""Training a tiny Llama with the backend reproduces eager training; the demo runs."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

import liger_compile
from liger_compile.cli import tiny_model
from tests.conftest import DEVICE
from tests.helpers import assert_close, load_script, tiny_causal_lm


def train(model, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=generator).to(DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_training_with_inductor_matches_eager():
    model = tiny_causal_lm("llama").to(DEVICE).train()
    reference = copy.deepcopy(model)
    with liger_compile.report.collect() as report:
        losses = train(liger_compile.optimize(model))
    expected = train(reference)
    assert report.counts()["rms_norm"] == 5
    assert_close(losses, expected, rtol=1e-5)
    # Adam turns rounding-level gradient differences on near-zero gradients into up to ~lr-sized steps; 1% of
    # one step (lr 1e-2) still catches any real divergence.
    for param, ref_param in zip(model.parameters(), reference.parameters()):
        assert_close(param, ref_param, rtol=1e-4, atol=1e-4)


def test_demo_runs_and_checks_loss_parity():
    result = subprocess.run(
        [sys.executable, "-m", "liger_compile.cli", "demo", "--steps", "2", "--compiler", "aot_eager"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    layers = tiny_model(large=DEVICE == "cuda").config.num_hidden_layers
    rewritten, near_misses = re.search(r"rms_norm +(\d+) +(\d+)", result.stdout).groups()
    assert (int(rewritten), int(near_misses)) == (2 * layers + 1, 0)
    assert "largest relative loss difference liger vs eager" in result.stdout


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU this would run the benchmarks themselves")
@pytest.mark.parametrize("which,script", [("ops", "bench_ops"), ("e2e", "bench_e2e")])
def test_bench_command_runs_the_checkout_benchmarks(which, script, capsys):
    from liger_compile.cli import main

    assert main(["bench", which]) == 0
    assert f"{script}: no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("start,fits_up_to,tried", [(4, 20, [4, 8, 16, 32]), (4, 2, [4, 2]), (4, 0, [4, 2, 1]),
                                                    (1, 1, [1, 2])])
def test_max_batch_search_doubles_while_it_trains_or_halves_until_it_does(start, fits_up_to, tried):
    def train(batch):
        return {"batch": batch} if batch <= fits_up_to else {"batch": batch, "error": "out of memory"}

    rows = load_script("benchmarks/bench_e2e.py").search_batch(start, train)
    assert [r["batch"] for r in rows] == tried


def test_max_seq_walk_stops_at_the_first_length_that_fails():
    rows = load_script("benchmarks/bench_e2e.py").walk_lengths([8, 16, 32, 64], lambda n: {"seq": n, **({"error": "oom"} if n > 16 else {})})
    assert [r["seq"] for r in rows] == [8, 16, 32]


def test_search_summary_names_each_modes_largest_batch_and_the_next_that_failed():
    rows = [{"mode": "a", "batch": 32, "error": "out of memory"}, {"mode": "a", "batch": 16},
            {"mode": "b", "batch": 16}, {"mode": "b", "batch": 32}, {"mode": "b", "batch": 64, "error": "timed out"},
            {"mode": "c", "batch": 16, "error": "out of memory"}, {"mode": "d", "batch": 8}]
    summary = load_script("benchmarks/bench_e2e.py").largest_trained(rows, "batch")
    assert summary == ("a 16 (32: out of memory); b 32 (64: timed out); c none (16: out of memory); "
                       "d 8 (no larger one tried)")


def test_e2e_results_say_what_our_modes_compiled_and_whether_the_lm_head_fused():
    from liger_compile.report import collect

    bench = load_script("benchmarks/bench_e2e.py")
    model = tiny_causal_lm("llama").to(DEVICE).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with collect() as report:
        liger_compile.optimize(model, compiler="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    rewrites = bench.rewrite_counts(report)["rewrites"]
    assert (rewrites["graphs"], rewrites["cross_entropy"]) == (1, ["fused linear"]), str(report)
    assert bench.rewrite_counts(None) == {}  # the peers' rows

    row = dict(mode="liger-optimize", batch=2, seq=16, tokens_per_s=1.0, step_ms=1.0, peak_gib=1.0, first_step_s=1.0,
               losses=[2.0, 1.0], rewrites=rewrites)
    result = dict(title="t", environment=dict(device="d", torch="t", triton="t", transformers="t", liger_kernel="l",
                                              date="today"), rows=[row])
    summary = bench.markdown(result).splitlines()[-1]
    assert summary.startswith("- liger-optimize: 1 graph; rms_norm 5, ") and "cross_entropy 1 (fused linear)" in summary


@pytest.mark.parametrize("mode,fused_sums", [("liger-optimize", 0), ("liger-optimize+residual_norm", 4)])
def test_e2e_optimize_modes_pass_their_options_and_train_like_eager(mode, fused_sums):
    from liger_compile.report import collect

    bench = load_script("benchmarks/bench_e2e.py")
    model = tiny_causal_lm("llama").to(DEVICE).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected = model(input_ids=ids, labels=ids).loss
    with collect() as report:
        loss = bench.prepare(mode, model)(input_ids=ids, labels=ids).loss
    # Every norm reads a residual sum but the first layer's input norm, which reads the embedding: 2 × 2 + 1 − 1.
    assert report.counts()["residual_norm"] == fused_sums, str(report)
    assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_e2e_optimize_modes_name_their_options_and_unknown_ones_are_refused():
    import argparse

    bench = load_script("benchmarks/bench_e2e.py")
    assert bench.optimize_options("liger-optimize") == {}
    assert bench.optimize_options("liger-optimize+residual_norm+allow_buffer_reuse=False") == {
        "residual_norm": True, "allow_buffer_reuse": False}
    assert bench.optimize_options("liger-kernel+inductor") is None
    assert bench.mode_name("liger-optimize+allow_buffer_reuse=False") == "liger-optimize+allow_buffer_reuse=False"
    for bad in ("liger-optimize+no_such_option", "liger-optimize+allow_buffer_reuse=Fals", "inductor+x"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad.replace("+", r"\+")):
            bench.mode_name(bad)
