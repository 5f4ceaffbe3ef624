"""FX rewrites of Dynamo graphs onto liger ops: one module per op family, plus the pass manager."""

from liger_compile.passes import (
    attention, cross_entropy, divergence, embedding, glu, int2_matmul, layer_norm, residual_norm, rms_norm, rope,
)
from liger_compile.passes.manager import Family, NearMiss, PassFailure, PassResult, Rewrite, run_passes

# Every rewrite family, in the order they run (LayerNorm's arithmetic contains a mean square: it goes first).
FAMILIES: dict[str, Family] = {
    layer_norm.FAMILY: layer_norm.apply,
    rms_norm.FAMILY: rms_norm.apply,
    residual_norm.FAMILY: residual_norm.apply,  # on the norms the two families above made
    glu.FAMILY: glu.apply,
    rope.FAMILY: rope.apply,
    attention.FAMILY: attention.apply,
    cross_entropy.FAMILY: cross_entropy.apply,
    divergence.FAMILY: divergence.apply,
    embedding.FAMILY: embedding.apply,
    int2_matmul.FAMILY: int2_matmul.apply,
}

__all__ = ["FAMILIES", "NearMiss", "PassFailure", "PassResult", "Rewrite", "run_passes"]
