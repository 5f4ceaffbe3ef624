"""Loss modules over the liger ops, for models composed by hand (the backend rewrites ``F.cross_entropy`` itself).

    loss = liger_compile.nn.FusedLinearCrossEntropyLoss()(hidden, lm_head.weight, labels)
"""

from __future__ import annotations

import torch

from liger_compile.ops.cross_entropy import cross_entropy
from liger_compile.ops.fused_linear_cross_entropy import fused_linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """``nn.CrossEntropyLoss`` on (N, V) logits (any leading dims are flattened), computed in fp32, with z-loss
    (`lse_square_scale`) and final-logit softcapping; see `liger_compile.ops.cross_entropy`."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                 return_z_loss: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap, return_z_loss=return_z_loss)

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), self.weight, **self.options)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``CrossEntropyLoss()(hidden @ weight.T + bias, target)`` without materialising the logits: hidden (..., H),
    weight (V, H), e.g. ``lm_head.weight``. `chunk_rows` trades memory for speed (0: automatic); see
    `liger_compile.ops.fused_linear_cross_entropy`."""

    def __init__(self, class_weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 softcap: float | None = None, chunk_rows: int = 0, return_z_loss: bool = False):
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=softcap, chunk_rows=chunk_rows,
                            return_z_loss=return_z_loss)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias,
                                          self.class_weight, **self.options)
