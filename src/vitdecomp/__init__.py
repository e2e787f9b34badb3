"""vitdecomp: split a vision transformer's representation into its parts and read them with text."""

from vitdecomp.api import decompose
from vitdecomp.components import ComponentLabel, Decomposition, TokenContributions
from vitdecomp.models.loading import LoadedModel, load_model

__all__ = ["ComponentLabel", "Decomposition", "LoadedModel", "TokenContributions", "decompose", "load_model"]
__version__ = "0.1.0"
