"""A multi-head language model (Medusa-style: head k predicts the token k + 1 places ahead) trained with
``backend="liger"``: each head's cross-entropy fuses with its lm_head, so none of the heads' logits exist whole.

    python examples/multi_head.py [--heads 4] [--steps 10] [--compiler inductor|aot_eager] [--large]

The backbone is a transformers Llama built from a config with random weights (no downloads). The script trains
eagerly and compiled from the same start, prints the report (one ``fused linear`` per head) and checks that the
losses agree.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import liger_compile
from liger_compile.cli import tiny_model
from liger_compile.report import collect


class MultiHeadLM(nn.Module):
    def __init__(self, heads: int, large: bool = False):
        super().__init__()
        self.backbone = tiny_model("llama", large=large).model
        hidden, vocab = self.backbone.config.hidden_size, self.backbone.config.vocab_size
        self.heads = nn.ModuleList(nn.Linear(hidden, vocab, bias=False) for _ in range(heads))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(ids).last_hidden_state
        loss = 0.0
        for k, head in enumerate(self.heads, start=1):  # head k: the token k places ahead
            logits = head(hidden)[:, :-k]
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, k:].reshape(-1))
        return loss / len(self.heads)


def train(model: nn.Module, batches) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--large", action="store_true", help="GPU-sized: 110M-parameter models, 1024 tokens a row")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MultiHeadLM(args.heads, args.large).to(device)
    generator = torch.Generator().manual_seed(0)
    vocab, length = model.backbone.config.vocab_size, 1024 if args.large else 64
    batches = [torch.randint(0, vocab, (4, length), generator=generator).to(device) for _ in range(args.steps)]

    eager_losses = train(copy.deepcopy(model), batches)
    compiled = torch.compile(model, backend="liger", options={"compiler": args.compiler})
    with collect() as report:
        liger_losses = train(compiled, batches)
    print(report)
    print(f"loss step 1: eager {eager_losses[0]:.5f}  liger {liger_losses[0]:.5f}   "
          f"step {args.steps}: eager {eager_losses[-1]:.5f}  liger {liger_losses[-1]:.5f}")
    fused = sum(r.variant == "fused linear" for r in report.rewrites)
    agree = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(eager_losses, liger_losses))
    print(f"heads fused with their loss: {fused} of {args.heads}; losses agree: {'yes' if agree else 'NO'}")
    return 0 if fused == args.heads and agree else 1


if __name__ == "__main__":
    assert liger_compile  # the backend is registered by the import
    sys.exit(main())
