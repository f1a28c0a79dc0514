"""exq: mixed-precision Mixture-of-Experts models fitted to their routing and sensitivity, at an exact memory budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exq.errors import ExqError, FormatError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from exq.compiler import Artifact, compile_plan
    from exq.profiling import RoutingProfile, profile
    from exq.runtime import load

# Stage entries load on first use, so `exq --help` and `import exq` don't pay for torch and transformers.
_LAZY = {
    "profile": "exq.profiling",
    "RoutingProfile": "exq.profiling",
    "compile_plan": "exq.compiler",
    "Artifact": "exq.compiler",
    "load": "exq.runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exq' has no attribute {name!r}")


__all__ = ["Artifact", "ExqError", "FormatError", "RoutingProfile", "__version__", "compile_plan", "load", "profile"]
