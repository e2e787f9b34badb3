"""From tokens to pixels: each token's relevance spread over its true pixel footprint in the model's
input, and the input mapped back onto the original image through the model's own resize / crop.

Relevance is kept as a *density*: a token's value is divided evenly over the pixels of its box, so a
map's sum over pixels equals the summed relevance of the tokens placed (token grids of different
strides, e.g. Swin's or MaxViT's stages, add up on one canvas). Prefix tokens (class, registers) have
no place and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vitdecomp.errors import VitDecompError


def place_tokens(values: Tensor, boxes: Tensor, size: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """``values [B, N]`` (per token, stream order) on an input canvas ``[B, H, W]``: each token's value
    spread evenly over its box ``boxes [N, 4]`` (top, left, bottom, right; ``-1`` rows skipped)."""
    b = values.shape[0]
    real = boxes[num_prefix:].long()
    vals = values[:, num_prefix:]
    canvas = values.new_zeros(b, size[0] * size[1])
    top, left = real[:, 0].clamp(0, size[0]), real[:, 1].clamp(0, size[1])
    bottom, right = real[:, 2].clamp(0, size[0]), real[:, 3].clamp(0, size[1])
    area = ((bottom - top) * (right - left)).clamp_min(1).to(values)
    # boxes of one grid share one size: paint by index (rows x cols of each box)
    hs, ws = int((bottom - top).max()), int((right - left).max())
    dy = torch.arange(hs).view(1, hs, 1)
    dx = torch.arange(ws).view(1, 1, ws)
    rows, cols = top.view(-1, 1, 1) + dy, left.view(-1, 1, 1) + dx
    inside = (rows < bottom.view(-1, 1, 1)) & (cols < right.view(-1, 1, 1))
    flat = (rows * size[1] + cols).expand(-1, hs, ws)[inside]  # [P]
    owner = torch.arange(len(real)).view(-1, 1, 1).expand(-1, hs, ws)[inside]
    canvas.index_add_(1, flat.to(values.device), (vals / area)[:, owner.to(values.device)])
    return canvas.view(b, *size)


@dataclass(frozen=True)
class InputGeometry:
    """Where the model's input sits in the original image: the original is resized to ``resized``
    (H, W) and the input is the window of ``crop`` (H, W) at ``offset`` (top, left) in it."""

    original: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    crop: tuple[int, int]

    def to_original(self, maps: Tensor) -> Tensor:
        """``[B, crop H, crop W]`` densities on the input -> ``[B, H0, W0]`` on the original image
        (zero where the model saw nothing); the sum over pixels is kept."""
        b = maps.shape[0]
        canvas = maps.new_zeros(b, *self.resized)
        top, left = self.offset
        ys, xs = max(top, 0), max(left, 0)
        ye, xe = min(top + self.crop[0], self.resized[0]), min(left + self.crop[1], self.resized[1])
        canvas[:, ys:ye, xs:xe] = maps[:, ys - top : ye - top, xs - left : xe - left]
        out = F.interpolate(canvas[:, None], size=self.original, mode="bilinear", align_corners=False)[:, 0]
        area = (self.resized[0] * self.resized[1]) / (self.original[0] * self.original[1])
        return out * area


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _resized(original: tuple[int, int], size: int | Sequence[int], max_size: int | None) -> tuple[int, int]:
    """torchvision's ``Resize`` output size: an int resizes the shorter side (aspect kept)."""
    if not isinstance(size, int) and len(size) == 2:
        return _pair(size)
    short_target = size if isinstance(size, int) else int(size[0])
    h, w = original
    short, long = min(h, w), max(h, w)
    new_short, new_long = short_target, int(short_target * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if h <= w else (new_long, new_short)


#: Preprocessing steps that do not move pixels.
_NEUTRAL = {"ToTensor", "MaybeToTensor", "Normalize", "MaybeConvertMode", "ConvertImageDtype", "PILToTensor"}


def input_geometry(preprocess: object, original: tuple[int, int]) -> InputGeometry:
    """Follow the model's own preprocessing (a torchvision ``Compose`` of ``Resize`` / ``CenterCrop``
    and pixel-value steps) for an image of size ``original (H, W)``."""
    steps = getattr(preprocess, "transforms", [preprocess])
    size, top, left = tuple(original), 0, 0
    resized, crop = size, size
    for t in steps:
        name = type(t).__name__
        if name == "Resize":
            if crop != resized:
                raise VitDecompError("a resize after a crop: cannot map the input back to the original image")
            size = resized = crop = _resized(size, t.size, getattr(t, "max_size", None))
        elif name == "CenterCrop":
            ch, cw = _pair(t.size)
            top += round((crop[0] - ch) / 2.0)
            left += round((crop[1] - cw) / 2.0)
            crop = (ch, cw)
        elif name not in _NEUTRAL and not name.startswith("Maybe"):
            raise VitDecompError(f"preprocessing step {name} moves pixels in a way vitdecomp cannot undo")
    return InputGeometry(tuple(original), resized, (top, left), crop)


#: The geometric steps :func:`square_preprocess` replaces.
_GEOMETRY = {"Resize", "CenterCrop"}


def input_size(preprocess: object) -> tuple[int, int]:
    """The ``(H, W)`` of the model's input that ``preprocess`` makes of a large square image."""
    return input_geometry(preprocess, (1024, 1024)).crop


def square_preprocess(preprocess: object) -> object:
    """``preprocess`` with its geometry replaced by one resize of the whole image to the model's input
    size (aspect ratio not kept, nothing cropped), with the model's own interpolation and pixel-value
    steps: how Chefer et al.'s ImageNet-segmentation evaluation feeds images (``Resize((224, 224))``),
    with the masks resized the same way (nearest). A torchvision ``Compose`` or the model's
    transformers image processor (:class:`~vitdecomp.models.hf_load.HFImageTransform`)."""
    from torchvision import transforms as tv

    size = input_size(preprocess)
    if hasattr(preprocess, "processor"):
        return _SquareProcessor(preprocess.processor, size)
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, list):
        raise VitDecompError(f"cannot resize to a square for preprocessing {type(preprocess).__name__}")
    resize = next((t for t in steps if type(t).__name__ == "Resize"), None)
    how = resize.interpolation if resize is not None else tv.InterpolationMode.BICUBIC
    rest = [t for t in steps if type(t).__name__ not in _GEOMETRY]
    return tv.Compose([tv.Resize(size, interpolation=how, antialias=True), *rest])


class _SquareProcessor:
    """A transformers image processor fed an image already resized to ``size`` (its own resample),
    with its resize and crop turned off; ``transforms`` states the geometry for :func:`input_geometry`."""

    def __init__(self, processor: object, size: tuple[int, int]) -> None:
        from torchvision import transforms as tv

        self.processor, self.size = processor, size
        self.transforms = [tv.Resize(size)]

    def __call__(self, image: object) -> Tensor:
        from PIL import Image

        resample = Image.Resampling(int(getattr(self.processor, "resample", Image.Resampling.BICUBIC)))
        im = image.convert("RGB").resize((self.size[1], self.size[0]), resample)  # type: ignore[attr-defined]
        off = {"do_resize": False, "do_center_crop": False}
        return self.processor(images=im, return_tensors="pt", **off)["pixel_values"][0]  # type: ignore[operator]
