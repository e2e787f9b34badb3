"""Model loading and the per-family adapters that say where a model's parts are.

``load_model`` / ``LoadedModel`` are imported on first use, so that importing a leaf such as
:mod:`vitdecomp.models.loaded` (the zoo does) does not import the loader's scheme table, which
reaches the zoo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["LoadedModel", "load_model"]

if TYPE_CHECKING:
    from vitdecomp.models.loading import LoadedModel, load_model


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'vitdecomp.models' has no attribute {name!r}")
    return getattr(importlib.import_module("vitdecomp.models.loading"), name)
