"""Loss modules over the liger ops, for models composed by hand (the backend rewrites ``F.cross_entropy``,
``F.kl_div`` and the JSD itself).

    loss = liger_compile.nn.FusedLinearCrossEntropyLoss()(hidden, lm_head.weight, labels)
    loss = liger_compile.nn.FusedLinearJSD(beta=0.5, temperature=2.0)(
        student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
"""

from __future__ import annotations

import torch

from liger_compile.ops.cross_entropy import cross_entropy
from liger_compile.ops.divergence import jsd, kl_div
from liger_compile.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_compile.ops.fused_linear_jsd import fused_linear_jsd
from liger_compile.ops.int2_matmul import CODES_PER_BYTE, matmul_int2_int8, pack_int2


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


class KLDivLoss(torch.nn.Module):
    """``nn.KLDivLoss`` (input and target of one shape), computed in fp32; see `liger_compile.ops.divergence`."""

    def __init__(self, reduction: str = "mean", log_target: bool = False):
        super().__init__()
        self.reduction, self.log_target = reduction, log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return kl_div(input, target, self.reduction, self.log_target)


def _rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.reshape(-1, tensor.shape[-1])


class JSD(torch.nn.Module):
    """The generalized Jensen-Shannon divergence between student and teacher log-probabilities (..., V), with
    labels (...) whose `ignore_index` rows count for nothing: beta 0 is the forward KL(teacher || student), 1 the
    reverse; see `liger_compile.ops.divergence`."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean"):
        super().__init__()
        self.options = dict(beta=beta, ignore_index=ignore_index, reduction=reduction)

    def forward(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor | None = None):
        return jsd(student_logp, teacher_logp, None if labels is None else labels.reshape(-1), **self.options)


class FusedLinearJSD(torch.nn.Module):
    """``JSD`` of the student's and teacher's ``log_softmax(hidden @ weight.T / temperature)`` without
    materialising either's logits: hidden (..., H) per side, weight (V, H) (an lm_head's); the teacher gets no
    gradient. See `liger_compile.ops.fused_linear_jsd`."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 reduction: str = "batchmean", chunk_rows: int = 0):
        super().__init__()
        self.options = dict(beta=beta, ignore_index=ignore_index, temperature=temperature, reduction=reduction,
                            chunk_rows=chunk_rows)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None):
        return fused_linear_jsd(_rows(student_hidden), student_weight, _rows(teacher_hidden), teacher_weight,
                                None if labels is None else labels.reshape(-1), **self.options)


class Int2Linear(torch.nn.Module):
    """Experimental, inference only: a BitNet b1.58-style linear layer, ``x @ w * weight_scale + bias`` with
    ternary weights w (in_features, out_features) in {-1, 0, 1} packed 2 bits each (`pack_int2`, buffer
    ``weight_packed``) and the activations quantized to int8 per row (absmax) in fp32; the int8 × int2 product is
    exact in int32 (`liger_compile.ops.int2_matmul`). No gradients: for serving a model trained (or ternarized,
    `from_linear`) elsewhere. in_features must be a multiple of 4.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features % CODES_PER_BYTE:
            raise ValueError(f"Int2Linear: in_features must be a multiple of 4, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        # 0x55 holds code 1 in each of its four fields: every weight 0 until loaded
        self.register_buffer("weight_packed", torch.full((in_features // CODES_PER_BYTE, out_features), 0x55,
                                                         dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones((), device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int2Linear":
        """Ternarize `linear`'s weight as BitNet b1.58 does: scale = mean(|W|), W ≈ round(W / scale) clamped to
        [-1, 1] times scale."""
        weight = linear.weight.detach().float()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device)
        weight_scale = weight.abs().mean().clamp_min(1e-5)
        module.weight_packed.copy_(pack_int2((weight / weight_scale).round().clamp(-1, 1).t()))
        module.weight_scale.copy_(weight_scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        scale = 127 / h.abs().amax(-1, keepdim=True).clamp_min(1e-5)
        xq = (h * scale).round().clamp(-128, 127).to(torch.int8)
        y = matmul_int2_int8(xq, self.weight_packed).float() / scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
