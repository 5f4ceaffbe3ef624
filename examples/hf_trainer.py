"""Train a causal LM with Hugging Face's Trainer and the liger backend: pass the model optimized in place.

    python examples/hf_trainer.py [--model llama | path/to/config_dir] [--steps 10] [--compiler inductor|aot_eager]
        [--large]

The model is built from a config with random weights (a tiny one by default; a config directory's model is
shrunk to 2 layers), trained on random tokens with gradient accumulation and gradient checkpointing, evaluated
and saved. ``TrainingArguments(torch_compile_backend="liger")`` is refused by accelerate; ``optimize(model,
inplace=True)`` keeps the model's class, forward signature and state_dict keys, which the Trainer relies on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import liger_compile
from liger_compile.cli import tiny_model
from liger_compile.report import collect


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main(argv: list[str] | None = None) -> int:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="a transformers model_type or a config directory")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--large", action="store_true", help="GPU-sized: 110M-parameter models, 1024 tokens a row")
    args = parser.parse_args(argv)

    model = tiny_model(args.model, large=args.large)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = liger_compile.optimize(model, inplace=True, compiler=args.compiler)
    vocab, length = model.config.vocab_size, 1024 if args.large else 64
    with tempfile.TemporaryDirectory() as output_dir:
        training = TrainingArguments(output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                     max_steps=args.steps, learning_rate=1e-3, logging_steps=1, report_to=[],
                                     save_strategy="no", use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(64, length, vocab),
                          eval_dataset=RandomTokens(8, length, vocab))
        with collect() as report:
            trainer.train()
            evaluation = trainer.evaluate()
        trainer.save_model(output_dir)
    print(report)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"training loss: step 1 {losses[0]:.4f}, step {len(losses)} {losses[-1]:.4f}; "
          f"eval loss {evaluation['eval_loss']:.4f}")
    fused = any(r.variant == "fused linear" for r in report.rewrites)
    print(f"lm_head fused into the loss in training: {'yes' if fused else 'NO'}")
    return 0 if fused and torch.isfinite(torch.tensor(losses)).all() else 1


if __name__ == "__main__":
    sys.exit(main())
