"""liger-compile: a torch.compile backend that rewrites LLM training graphs onto fused Triton kernels.

    model = torch.compile(model, backend="liger")      # the backend (registered as an entry point)
    model = liger_compile.optimize(model)               # the same, with options checked up front
    y = torch.ops.liger.rms_norm(x, w, 1e-6)            # eager custom ops, CPU and CUDA
    print(liger_compile.explain(model, *inputs))        # what is rewritten, where, and what is not
    model = liger_compile.AutoModelForCausalLM.from_pretrained(path)  # transformers' auto class, optimized
"""

from liger_compile import nn, ops
from liger_compile.auto import AutoModelForCausalLM
from liger_compile.backend import liger_backend
from liger_compile.config import Config
from liger_compile.optimize import explain, optimize
from liger_compile.report import Report

backend = liger_backend

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLM", "Config", "Report", "backend", "explain", "liger_backend", "nn", "ops", "optimize"]
