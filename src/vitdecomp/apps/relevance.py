"""The relevance-map contract the segmentation methods share, and the target they all explain.

A relevance map is a callable ``(model, images [B, 3, H, W], directions [B, D]) -> [B, H, W]``: per
image, where in the model's input the scalar ``<representation, direction>`` comes from. It is the
token-map contract of :class:`vitdecomp.apps.token_maps.DirectionalTokenMap` with one direction per
image (in the model's own representation space), so that every method can explain each image's own
prediction. The scalar is linear in the representation, so a class logit ``w_c . r + b_c`` is the
direction ``w_c`` (its bias moves no gradient and no token).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vitdecomp.models.loaded import LoadedModel


class RelevanceMap(Protocol):
    """``(model, images [B, 3, H, W], directions [B, D], context=None) -> [B, H, W]`` relevance in input
    pixels. ``context`` (a :class:`vitdecomp.apps.specific.ValueContext`: every value's direction, the
    images' reading, the value explained) is there for maps that use it (the decomposition's
    value-specific map); the gradient methods explain the scalar alone and ignore it."""

    name: str

    def __call__(self, model: object, images: Tensor, directions: Tensor, context: Any = None) -> Tensor: ...


def network(model: object) -> nn.Module:
    """The ``nn.Module`` of a :class:`~vitdecomp.models.loaded.LoadedModel` or of a plain module (a
    plain module is kept whole even when it has a ``model`` attribute, as transformers' DINOv3 does)."""
    return model.model if isinstance(model, LoadedModel) else model


class Representation(nn.Module):
    """``images [B, 3, H, W] -> [B, D]``: the representation the decomposition splits, with gradients
    (timm: ``forward_head(forward_features(x), pre_logits=True)``; open_clip: ``encode_image``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self.net, "encode_image"):
            return self.net.encode_image(x)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


class Along:
    """A GradCAM target (``pytorch_grad_cam`` calls it on one image's output): ``<output, u>``."""

    def __init__(self, direction: Tensor) -> None:
        self.direction = direction

    def __call__(self, output: Tensor) -> Tensor:
        return (output * self.direction.to(output)).sum(-1)


def upsample(grid_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` token-grid relevance -> ``[B, H, W]`` by bilinear interpolation."""
    return torch.nn.functional.interpolate(grid_maps[:, None].float(), size=size, mode="bilinear")[:, 0]
