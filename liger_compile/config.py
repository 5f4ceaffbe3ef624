"""Which rewrites run and what compiles the rest: from the backend's `options` and the environment.

``options`` may hold

- a family name (``"rms_norm"``, ...) mapped to a bool: that rewrite on or off (all are on by default but
  those in ``OFF_BY_DEFAULT``, not yet shown to help end to end);
- ``"compiler"``: what compiles the rewritten graph, ``"inductor"`` (default), ``"aot_eager"`` (AOTAutograd
  without codegen: fast, good for CPU tests and debugging) or ``"eager"`` (run the rewritten graph as is);
- anything else: an Inductor config patch, as ``torch.compile(options=...)`` takes it.

``LIGER_COMPILE_DISABLE=rms_norm,...`` (or ``all``) turns families off whatever the options say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from liger_compile.passes import FAMILIES

ENV_DISABLE = "LIGER_COMPILE_DISABLE"
OFF_BY_DEFAULT = frozenset({"residual_norm"})
COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class Config:
    families: tuple[str, ...]  # enabled rewrite families, in run order
    compiler: str = "inductor"
    inductor_options: dict[str, Any] = field(default_factory=dict)


def _disabled_by_env() -> set[str]:
    names = {name.strip() for name in os.environ.get(ENV_DISABLE, "").split(",") if name.strip()}
    if "all" in names:
        return set(FAMILIES)
    unknown = names - set(FAMILIES)
    if unknown:
        raise ValueError(f"{ENV_DISABLE} names unknown rewrite families {sorted(unknown)}; "
                         f"known: {', '.join(FAMILIES)} or 'all'")
    return names


def _check_inductor_options(options: dict[str, Any]) -> None:
    if not options:
        return
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    unknown = [key for key in options if key.replace("-", "_") not in known]
    if unknown:
        raise ValueError(f"liger backend: unknown options {unknown}: not a rewrite family "
                         f"({', '.join(FAMILIES)}), 'compiler', or an Inductor config option")


def resolve(options: dict[str, Any] | None) -> Config:
    """Validate `options` and the environment into a Config; raises ValueError naming what is wrong."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if compiler not in COMPILERS:
        raise ValueError(f"liger backend: compiler must be one of {COMPILERS}, got {compiler!r}")
    enabled = {name: bool(options.pop(name, name not in OFF_BY_DEFAULT)) for name in FAMILIES}
    for name in _disabled_by_env():
        enabled[name] = False
    if compiler != "inductor" and options:
        raise ValueError(f"liger backend: Inductor options {sorted(options)} given with compiler={compiler!r}")
    _check_inductor_options(options)
    return Config(tuple(name for name in FAMILIES if enabled[name]), compiler, options)
