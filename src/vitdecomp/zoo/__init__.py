"""vitdecomp's zoo: small models trained on the built-in world with the real libraries' classes.

``load_zoo_model("deit")`` (or ``vitdecomp.load_model("zoo:deit")``) returns a
:class:`~vitdecomp.models.loaded.LoadedModel`; ``list_zoo()`` returns the models' cards.

Layers, each importing only from those above it: ``models`` (architectures) and ``recipes``;
``data``; ``cards`` (weights and card files); ``hub`` (loading); ``evaluate``; ``objectives``;
``train``; ``cli``. Nothing here imports :mod:`vitdecomp.models.loading`, whose ``zoo:`` scheme
reaches :func:`load_zoo_model`.
"""

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
