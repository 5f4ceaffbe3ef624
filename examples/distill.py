"""Distil a tiny teacher into a tiny student with ``backend="liger"``: the generalized JSD of TRL's GKD trainer,
written in plain PyTorch, becomes one fused op that computes both lm_heads and the loss in row chunks, so neither
model's logits exist whole.

    python examples/distill.py [--steps 20] [--compiler inductor|aot_eager] [--large]

Both models are transformers Llamas built from configs with random weights (no downloads); the teacher is
frozen. The script trains the student eagerly and compiled from the same start, prints the backend's report (look
for ``fused linear jsd``) and checks that the two runs' losses agree.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import liger_compile
from liger_compile.report import collect


def generalized_jsd(student_logp, teacher_logp, beta):
    """TRL's generalized_jsd_loss: beta KL(teacher || mixture) + (1 - beta) KL(student || mixture), per token."""
    beta = torch.tensor(beta, dtype=student_logp.dtype)
    mixture = torch.logsumexp(torch.stack([student_logp + torch.log(1 - beta), teacher_logp + torch.log(beta)]), 0)
    jsd = (beta * F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(mixture, student_logp, reduction="none", log_target=True))
    return jsd.sum() / (jsd.shape[0] * jsd.shape[1])


class Distillation(nn.Module):
    """The student's loss against a frozen teacher on the same tokens, at a temperature."""

    def __init__(self, student, teacher, beta=0.5, temperature=2.0):
        super().__init__()
        self.student, self.teacher = student, teacher.requires_grad_(False).eval()
        self.beta, self.temperature = beta, temperature

    def forward(self, input_ids):
        student_hidden = self.student.model(input_ids).last_hidden_state
        with torch.no_grad():
            teacher_hidden = self.teacher.model(input_ids).last_hidden_state
        student_logits = self.student.lm_head(student_hidden).float() / self.temperature
        teacher_logits = self.teacher.lm_head(teacher_hidden).float() / self.temperature
        return generalized_jsd(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                               self.beta)


def llama(hidden: int, layers: int, seed: int, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model: nn.Module, batches) -> list[float]:
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--large", action="store_true", help="GPU-sized: a 4-layer student of width 1024 and a "
                        "teacher of width 2048, vocabulary 32000, 1024 tokens a row")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (width, layers) of student and teacher, vocabulary, tokens a row
    (student, teacher), vocab, length = (((1024, 4), (2048, 4)), 32000, 1024) if args.large else (
        ((64, 2), (128, 3)), 512, 64)
    distillation = Distillation(llama(*student, seed=0, vocab=vocab), llama(*teacher, seed=1, vocab=vocab)).to(device)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (4, length), generator=generator).to(device) for _ in range(args.steps)]

    eager_losses = train(copy.deepcopy(distillation), batches)
    compiled = torch.compile(copy.deepcopy(distillation), backend="liger", options={"compiler": args.compiler})
    with collect() as report:
        liger_losses = train(compiled, batches)
    print(report)
    print(f"JSD  step 1: eager {eager_losses[0]:.5f}  liger {liger_losses[0]:.5f}   "
          f"step {args.steps}: eager {eager_losses[-1]:.5f}  liger {liger_losses[-1]:.5f}")
    fused = any(r.variant == "fused linear jsd" for r in report.rewrites)
    agree = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(eager_losses, liger_losses))
    print(f"fused linear JSD: {'yes' if fused else 'NO'}; losses agree: {'yes' if agree else 'NO'}")
    return 0 if fused and agree else 1


if __name__ == "__main__":
    assert liger_compile  # the backend is registered by the import
    sys.exit(main())
