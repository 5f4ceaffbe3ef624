"""torch.library custom ops (``torch.ops.liger.*``) and their eager Python wrappers."""

from liger_compile.ops._library import LigerOpError, keep_dtypes_under_autocast
from liger_compile.ops.cross_entropy import cross_entropy
from liger_compile.ops.divergence import jsd, kl_div
from liger_compile.ops.embedding import embedding
from liger_compile.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_compile.ops.fused_linear_jsd import fused_linear_jsd
from liger_compile.ops.glu import gated_activation_packed, gated_linear, geglu, swiglu
from liger_compile.ops.int2_matmul import matmul_int2_int8, pack_int2, unpack_int2
from liger_compile.ops.layer_norm import add_layer_norm, layer_norm
from liger_compile.ops.rms_norm import add_rms_norm, rms_norm
from liger_compile.ops.rope import rope, rope_pair

keep_dtypes_under_autocast()

__all__ = [
    "LigerOpError", "add_layer_norm", "add_rms_norm", "cross_entropy", "embedding", "fused_linear_cross_entropy",
    "fused_linear_jsd", "gated_activation_packed", "gated_linear", "geglu", "jsd", "kl_div", "layer_norm", "rms_norm", "rope", "rope_pair", "swiglu",
    "matmul_int2_int8", "pack_int2", "unpack_int2",
]
