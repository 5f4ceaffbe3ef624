"""``liger_compile.AutoModelForCausalLM``: transformers' auto class, returning the model optimized in place.

    model = liger_compile.AutoModelForCausalLM.from_pretrained("path/or/hub-id", torch_dtype=torch.bfloat16)
    model = liger_compile.AutoModelForCausalLM.from_config(config, liger_options={"compiler": "aot_eager"})

The one-line analogue of Liger-Kernel's ``AutoLigerKernelForCausalLM``, for any architecture: nothing is patched,
the model is compiled with the liger backend (`optimize(model, inplace=True)`), so it keeps its class,
``state_dict`` keys and ``save_pretrained``. `liger_options` are `optimize`'s keyword arguments.
"""

from __future__ import annotations

from typing import Any

import torch

from liger_compile.optimize import optimize


class AutoModelForCausalLM:
    """``transformers.AutoModelForCausalLM``'s constructors, each returning the model optimized in place."""

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...) or .from_config(...)")

    @staticmethod
    def from_pretrained(name_or_path: str, *args: Any, liger_options: dict[str, Any] | None = None,
                        **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM as Auto

        return optimize(Auto.from_pretrained(name_or_path, *args, **kwargs), inplace=True, **(liger_options or {}))

    @staticmethod
    def from_config(config: Any, *, liger_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM as Auto

        return optimize(Auto.from_config(config, **kwargs), inplace=True, **(liger_options or {}))
