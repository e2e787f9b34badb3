"""vitdecomp: split a vision transformer's representation into its parts and read them with text.

The names below are imported on first use (PEP 562), so that ``import vitdecomp`` (and the
command line's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "decompose": "vitdecomp.api",
    "ComponentLabel": "vitdecomp.components",
    "Decomposition": "vitdecomp.components",
    "TokenContributions": "vitdecomp.components",
    "LoadedModel": "vitdecomp.models.loading",
    "load_model": "vitdecomp.models.loading",
    "register_adapter": "vitdecomp.models.registry",
}
__all__ = [
    "ComponentLabel",
    "Decomposition",
    "LoadedModel",
    "TokenContributions",
    "decompose",
    "load_model",
    "register_adapter",
]

if TYPE_CHECKING:
    from vitdecomp.api import decompose
    from vitdecomp.components import ComponentLabel, Decomposition, TokenContributions
    from vitdecomp.models.loading import LoadedModel, load_model
    from vitdecomp.models.registry import register_adapter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitdecomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
