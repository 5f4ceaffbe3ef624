"""The paths users meet the backend through: transformers' Trainer with an in-place optimized model (gradient
accumulation, gradient checkpointing, evaluation, save_pretrained) and the AutoModelForCausalLM one-liner."""

import copy
import inspect
from collections import Counter

import pytest
import torch

import liger_compile
from liger_compile.report import collect
from tests.conftest import DEVICE
from tests.helpers import assert_close, tiny_causal_lm

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (a test dependency)")


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows=16, length=16):
        self.ids = torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer_run(model, output_dir):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=DEVICE == "cpu", seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), eval_dataset=RandomTokens(8))
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model(str(output_dir))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, evaluation["eval_loss"], load_file(str(output_dir / "model.safetensors"))


def test_trainer_with_an_optimized_model_trains_evaluates_and_saves_as_eager(tmp_path):
    model = tiny_causal_lm("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    with collect() as report:
        losses, eval_loss, saved = trainer_run(liger_compile.optimize(model, compiler="aot_eager", inplace=True),
                                               tmp_path / "liger")
    expected_losses, expected_eval_loss, expected_saved = trainer_run(reference, tmp_path / "eager")
    training = report.graphs[0].rewrites  # then evaluation's graph, which keeps the logits
    assert Counter(r.family for r in training) == {"rms_norm": 5, "glu": 2, "rope": 2, "cross_entropy": 1,
                                                   "embedding": 1}
    assert [r.variant for r in training if r.family == "cross_entropy"] == ["fused linear"], str(report)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert eval_loss == pytest.approx(expected_eval_loss, rel=1e-4)  # evaluation found the labels
    assert saved.keys() == expected_saved.keys()  # no `_orig_mod.` prefix
    # AdamW's normalized steps make rounding-level differences of near-zero gradients up to lr-sized (1e-2):
    # 5% of one step over 3 steps still catches a real divergence, which the losses above would show anyway
    for name, tensor in saved.items():
        assert_close(tensor, expected_saved[name], rtol=1e-3, atol=5e-4)


def test_optimize_keeps_forwards_signature():
    model = tiny_causal_lm("llama")
    for optimized in (liger_compile.optimize(model), liger_compile.optimize(copy.deepcopy(model), inplace=True)):
        parameters = inspect.signature(optimized.forward).parameters
        assert "input_ids" in parameters and "labels" in parameters


@pytest.mark.parametrize("constructor", ["from_config", "from_pretrained"])
def test_auto_model_for_causal_lm_one_liner(constructor, tmp_path):
    model = tiny_causal_lm("qwen3")
    model.save_pretrained(tmp_path)
    options = {"compiler": "aot_eager"}
    if constructor == "from_config":
        torch.manual_seed(0)
        optimized = liger_compile.AutoModelForCausalLM.from_config(model.config, liger_options=options)
        optimized.load_state_dict(model.state_dict())
    else:
        optimized = liger_compile.AutoModelForCausalLM.from_pretrained(str(tmp_path), liger_options=options)
    assert type(optimized) is type(model)
    optimized, model = optimized.to(DEVICE).train(), model.to(DEVICE).train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with collect() as report:
        loss = optimized(input_ids=ids, labels=ids).loss
    assert_close(loss, model(input_ids=ids, labels=ids).loss)
    assert report.counts()["rms_norm"] == 9 and report.counts()["cross_entropy"] == 1, str(report)


def test_explain_a_config_directory(tmp_path, capsys):
    """A checkpoint's config.json, shrunk: Qwen3's explicit head_dim and q/k norms survive the shrinking."""
    from transformers import AutoConfig

    from liger_compile.cli import main

    AutoConfig.for_model("qwen3", hidden_size=2048, num_hidden_layers=28, head_dim=128).save_pretrained(tmp_path)
    assert main(["explain", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rms_norm                 9" in printed and "rope                     2" in printed, printed
