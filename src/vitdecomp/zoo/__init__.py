"""vitdecomp's zoo: small models trained on the built-in world with the real libraries' classes.

``load_zoo_model("deit")`` (or ``vitdecomp.load_model("zoo:deit")``) returns a
:class:`~vitdecomp.models.loading.LoadedModel`; ``list_zoo()`` returns the models' cards.
"""

from vitdecomp.zoo.hub import list_zoo, load_zoo_model, read_card
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
