"""vitdecomp's zoo: small models trained on the built-in world with the real libraries' classes.

``load_zoo_model("deit")`` (or ``vitdecomp.load_model("zoo:deit")``) returns a
:class:`~vitdecomp.models.loaded.LoadedModel`; ``list_zoo()`` returns the models' cards.

Layers, each importing only from those above it: ``models`` (architectures) and ``recipes``;
``data``; ``cards`` (weights and card files); ``hub`` (loading); ``evaluate``; ``objectives``;
``train``; ``cli``. Nothing here imports :mod:`vitdecomp.models.loading`, whose ``zoo:`` scheme
reaches :func:`load_zoo_model`. The names below are imported on first use (PEP 562), so that
``vitdecomp zoo --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ZOO_CONFIGS": "vitdecomp.zoo.models",
    "ZOO_NAMES": "vitdecomp.zoo.models",
    "build_model": "vitdecomp.zoo.models",
    "representation": "vitdecomp.zoo.models",
    "list_zoo": "vitdecomp.zoo.cards",
    "read_card": "vitdecomp.zoo.cards",
    "load_zoo_model": "vitdecomp.zoo.hub",
}

if TYPE_CHECKING:
    from vitdecomp.zoo.cards import list_zoo, read_card
    from vitdecomp.zoo.hub import load_zoo_model
    from vitdecomp.zoo.models import ZOO_CONFIGS, ZOO_NAMES, build_model, representation

__all__ = [
    "ZOO_CONFIGS",
    "ZOO_NAMES",
    "build_model",
    "list_zoo",
    "load_zoo_model",
    "read_card",
    "representation",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitdecomp.zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
