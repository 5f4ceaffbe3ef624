"""torch.library custom ops (``torch.ops.liger.*``) and their eager Python wrappers."""

from liger_compile.ops._library import LigerOpError
from liger_compile.ops.rms_norm import rms_norm

__all__ = ["LigerOpError", "rms_norm"]
