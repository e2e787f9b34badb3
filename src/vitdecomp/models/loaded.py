"""What every loader returns (:class:`LoadedModel`) and the checkpoint digest its ``weights_id`` uses.

A leaf module: the scheme table in :mod:`vitdecomp.models.loading` and the zoo's own loader both
build on it, so the zoo never imports the loading module that reaches it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class LoadedModel:
    """A model in eval mode with the preprocessing it was trained with.

    ``model`` is the whole object (for open_clip the CLIP model, text tower included);
    ``preprocess`` maps a PIL image to a ``[3, H, W]`` tensor; ``tokenizer`` is set for CLIP models.
    ``weights_id`` identifies the weights (name + source + checkpoint digest) for cache keys.
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    source: str  # "timm" | "open_clip" | "transformers" | "zoo"
    weights_id: str
    tokenizer: Callable[..., torch.Tensor] | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_clip(self) -> bool:
        return self.tokenizer is not None

    @property
    def attribute_heads(self) -> dict[str, int]:
        """The model's own classifier as one logit block per attribute, ``{attribute: classes}`` in
        logit order (the zoo's multi-attribute models, ``info["attribute_heads"]``); ``{}`` otherwise."""
        return dict(self.info.get("attribute_heads", {}))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info.get("image_size", (224, 224)))  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> LoadedModel:
        self.model.to(device)
        return self


def file_digest(path: str | Path, length: int = 16) -> str:
    """A short sha256 of a file's bytes (identifies local checkpoints in cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
