"""Train a causal LM with PyTorch Lightning and the liger backend: the LightningModule holds the model optimized
in place, so the lm_head fuses with the loss.

    python examples/train_lightning.py [--model llama | path/to/config_dir] [--steps 10] [--compiler inductor|aot_eager]
        [--large]

The model is built from a config with random weights (a tiny one by default; a config directory's model is
shrunk to 2 layers) and trained on random tokens by ``lightning.Trainer``, eagerly and compiled from the same
start. The script prints the backend's report (look for ``fused linear``) and checks that the losses agree.
"""

from __future__ import annotations

import argparse
import copy
import sys

import lightning
import torch

import liger_compile
from liger_compile.cli import tiny_model
from liger_compile.report import collect


class LanguageModel(lightning.LightningModule):
    """Trains `model` (a transformers causal LM) on batches of token ids, recording each step's loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_index: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # SGD's steps are proportional to the gradients, so the loss curves compare them (Adam's normalised steps
        # would hide a gradient off by a constant factor)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[float]:
    module = LanguageModel(model)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    trainer = lightning.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, batches)
    return module.losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="a transformers model_type or a config directory")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--large", action="store_true", help="GPU-sized: 110M-parameter models, 1024 tokens a row")
    args = parser.parse_args(argv)

    model = tiny_model(args.model, large=args.large)
    length = 1024 if args.large else 64
    ids = torch.randint(0, model.config.vocab_size, (4 * args.steps, length),
                        generator=torch.Generator().manual_seed(0))
    eager_losses = train(copy.deepcopy(model), ids, args.steps)
    with collect() as report:
        liger_losses = train(liger_compile.optimize(model, inplace=True, compiler=args.compiler), ids, args.steps)
    print(report)
    print(f"loss step 1: eager {eager_losses[0]:.5f}  liger {liger_losses[0]:.5f}   "
          f"step {args.steps}: eager {eager_losses[-1]:.5f}  liger {liger_losses[-1]:.5f}")
    fused = any(r.variant == "fused linear" for r in report.rewrites)
    agree = len(liger_losses) == len(eager_losses) == args.steps and all(
        abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(eager_losses, liger_losses))
    print(f"lm_head fused into the loss: {'yes' if fused else 'NO'}; losses agree: {'yes' if agree else 'NO'}")
    return 0 if fused and agree else 1


if __name__ == "__main__":
    sys.exit(main())
