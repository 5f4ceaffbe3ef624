"""The examples run as documented (few steps): examples/distill.py fuses the JSD with both lm_heads and trains
the student to eager's losses; examples/hf_trainer.py trains, evaluates and saves through HF's Trainer;
examples/multi_head.py fuses every head's lm_head with its loss; examples/train_lightning.py trains through
Lightning's Trainer to eager's losses."""

from collections import Counter

import pytest

from liger_compile.report import collect
from tests.helpers import load_script


def load(name: str):
    return load_script(f"examples/{name}.py")


def test_distill_fuses_the_jsd_and_matches_eager(capsys):
    assert load("distill").main(["--steps", "2", "--compiler", "aot_eager"]) == 0
    assert "fused linear jsd" in capsys.readouterr().out


def test_hf_trainer_trains_with_the_fused_loss(capsys):
    assert load("hf_trainer").main(["--steps", "2", "--compiler", "aot_eager"]) == 0
    assert "lm_head fused into the loss in training: yes" in capsys.readouterr().out


def test_multi_head_fuses_every_head(capsys):
    assert load("multi_head").main(["--steps", "2", "--heads", "2", "--compiler", "aot_eager"]) == 0
    assert "heads fused with their loss: 2 of 2; losses agree: yes" in capsys.readouterr().out


def test_train_lightning_fuses_the_loss_and_matches_eager(capsys):
    pytest.importorskip("lightning", reason="Lightning is a test dependency")
    with collect() as report:
        assert load("train_lightning").main(["--steps", "2", "--compiler", "aot_eager"]) == 0
    assert "lm_head fused into the loss: yes; losses agree: yes" in capsys.readouterr().out
    assert Counter(r.family for r in report.rewrites) == {"rms_norm": 5, "glu": 2, "rope": 2, "cross_entropy": 1,
                                                          "embedding": 1}, str(report)
