"""GradCAM (``pytorch_grad_cam``, the installed ``grad-cam`` package) behind the relevance-map contract
of :mod:`vitdecomp.apps.relevance`, with the token layouts of each family turned into the ``[B, C, h, w]``
activations GradCAM expects (its ``reshape_transform``):

* ViT (timm ``VisionTransformer``): the last block's ``norm1`` output ``[B, prefix + h*w, C]``; the
  prefix tokens (class, registers) are dropped and the rest laid on the patch grid (the package's own
  ViT recipe);
* Swin (timm ``SwinTransformer``): the last block's ``norm1`` output, channels-last ``[B, h, w, C]``;
* MaxViT (timm ``MaxxVit``): the last block's grid-attention ``norm1`` output, channels-last
  ``[B, h, w, C]`` (or already ``[B, C, h, w]`` when the model runs attention channels-first);
* open_clip ``VisionTransformer``: the last residual block's ``ln_1`` (class token dropped).

The explained scalar is ``<representation, direction>`` (:class:`~vitdecomp.apps.relevance.Along`);
the package normalises each map to ``[0, 1]`` and resizes it to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pytorch_grad_cam import GradCAM
from torch import Tensor, nn

from vitdecomp.apps.relevance import Along, Representation, network
from vitdecomp.errors import VitDecompError


@dataclass(frozen=True)
class CamLayer:
    """Where GradCAM reads a family: the module and how its output becomes ``[B, C, h, w]``."""

    module: nn.Module
    reshape: Callable[[Tensor], Tensor]
    where: str


def tokens_to_grid(prefix: int, grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """``[B, prefix + h*w, C] -> [B, C, h, w]`` (ViT layouts; prefix tokens dropped)."""

    def reshape(t: Tensor) -> Tensor:
        return t[:, prefix:].reshape(t.shape[0], grid[0], grid[1], t.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def channels_last_to_first(t: Tensor) -> Tensor:
    """``[B, h, w, C] -> [B, C, h, w]`` (Swin, MaxViT's channels-last attention)."""
    return t.permute(0, 3, 1, 2)


def _identity(t: Tensor) -> Tensor:
    return t


def cam_layer(model: object) -> CamLayer:
    """The GradCAM layer of a ViT, Swin, MaxViT or open_clip model; :class:`VitDecompError` otherwise."""
    net = network(model)
    kind = type(net).__name__
    if hasattr(net, "blocks") and hasattr(net, "patch_embed") and hasattr(net, "num_prefix_tokens"):
        grid = tuple(net.patch_embed.grid_size)
        return CamLayer(net.blocks[-1].norm1, tokens_to_grid(net.num_prefix_tokens, grid), "blocks[-1].norm1")
    if kind.startswith("SwinTransformer"):
        return CamLayer(net.layers[-1].blocks[-1].norm1, channels_last_to_first, "layers[-1].blocks[-1].norm1")
    if kind == "MaxxVit":
        block = net.stages[-1].blocks[-1]
        reshape = _identity if getattr(block, "nchw_attn", False) else channels_last_to_first
        return CamLayer(block.attn_grid.norm1, reshape, "stages[-1].blocks[-1].attn_grid.norm1")
    visual = getattr(net, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):
        grid = tuple(visual.grid_size)
        return CamLayer(visual.transformer.resblocks[-1].ln_1, tokens_to_grid(1, grid), "visual...resblocks[-1].ln_1")
    raise VitDecompError(f"GradCAM: no token layout known for {kind} (ViT, Swin, MaxViT, open_clip are)")


class GradCamMap:
    """The relevance-map contract for GradCAM: ``[B, H, W]`` in ``[0, 1]`` on the input pixels
    (``context`` is ignored: the gradient explains the scalar alone)."""

    name = "gradcam"

    def __call__(self, model: object, images: Tensor, directions: Tensor, context: object = None) -> Tensor:
        layer = cam_layer(model)
        wrapped = Representation(network(model))
        targets = [Along(u) for u in directions]
        with GradCAM(model=wrapped, target_layers=[layer.module], reshape_transform=layer.reshape) as cam:
            maps = cam(input_tensor=images, targets=targets)
        return torch.from_numpy(maps).float()
