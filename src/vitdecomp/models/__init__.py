"""Model loading and the per-family adapters that say where a model's parts are."""

from vitdecomp.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
