"""Triton device functions the kernels share."""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Round fp32 values to `dtype` and back: the value PyTorch stores for an intermediate of that dtype."""
    return x.to(dtype).to(tl.float32)
