"""Value-specific maps: where an image shows a feature's value *rather than what it shows instead*,
above the image's own noise. A map for a value the image does not show is not positive on its object.

Maps are linear in their direction, so the maps of all ``V`` values of a feature, ``values [B, V, H, W]``
(one decomposition, one direction per value), are made once and combined per image:

1. **reading** ``p [B, V]``: how the whole image reads the feature (:func:`reading`: the softmax of the
   reader's logit scale times the cosines of the aligned whole representation with the value texts; for
   a classifier, the softmax of its own logits). No labels.
2. **alternative** ``a [B, V]`` (:func:`alternatives`): the reading with the value's own share spread
   evenly over the other values, ``a_v = 0``. For an image that shows ``v`` the alternative is the
   average other value (the earlier rule: the text minus the mean of the other values' texts); for an
   image that shows ``c != v`` it is ``c``.
3. **contrast** ``m = map_v - sum_u a_u map_u``: positive where the heads favour ``v`` over the alternative.
4. **null level** ``tau [B]`` (:func:`null_level`): the median, over ordered pairs ``(u, w)`` of values the
   image does not read (all but its best-read one), of the highest value of ``map_u - map_w`` — how high
   a map between two values the image does not show rises in this image.
5. **the map**: ``m`` shrunk toward 0 by ``(1 - p_v) tau`` (:func:`shrink`, a soft threshold): relevance
   below the image's own null is not shown, and the more the image reads as ``v`` the lower the bar.

Why (docs/applications.md, "Text-specific maps"): along the text minus the other values' mean, a map for
a colour the object does not have still pointed into the object on most world scenes — the object is
where every direction's token contributions are large (a random direction points into it too); the
alternative turns the object negative, and the null removes the small positive specks left at its edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: At most this many values (the image's most probable ones besides its read value) form the null's pairs.
NULL_VALUES = 8


def reading(scores: Tensor, scale: float) -> Tensor:
    """``p [B, V]``: the softmax of ``scale * scores`` (cosines with the value texts, or logits with scale 1)."""
    return torch.softmax(scale * scores.float(), dim=-1)


def alternatives(p: Tensor, value: Tensor) -> Tensor:
    """``a [B, V]``: the reading ``p [B, V]`` with each image's ``value [B]`` share spread evenly over its
    other values; ``a[b, value[b]] = 0`` and each row sums to 1."""
    b, v = p.shape
    rows = torch.arange(b)
    own = p[rows, value]
    a = p.clone()
    a[rows, value] = 0
    a = a + (own / max(v - 1, 1))[:, None]
    a[rows, value] = 0
    return a


def null_level(values: Tensor, p: Tensor) -> Tensor:
    """``tau [B]`` (>= 0): per image, the median over ordered pairs ``(u, w)`` of values other than the
    one it reads best (``argmax p``; of those, its :data:`NULL_VALUES` most probable) of
    ``max (values[u] - values[w])`` over the pixels; ``values [B, V, H, W]``, ``p [B, V]``. Fewer than
    two other values: 0."""
    b, v = values.shape[:2]
    flat = values.reshape(b, v, -1)
    out = flat.new_zeros(b)
    order = p.argsort(-1, descending=True).cpu()
    for i in range(b):
        keep = order[i, 1 : 1 + NULL_VALUES]
        if len(keep) < 2:
            continue
        x = flat[i, keep]  # [K, P]
        peaks = (x[:, None] - x[None]).amax(-1)  # [K, K]
        off = ~torch.eye(len(keep), dtype=torch.bool)
        out[i] = peaks[off].median().clamp_min(0)
    return out


def shrink(m: Tensor, level: Tensor) -> Tensor:
    """Soft threshold: ``m [B, ...]`` moved toward 0 by ``level [B]`` (values within it become 0)."""
    t = level.reshape(-1, *([1] * (m.dim() - 1))).to(m)
    return m - m.clamp(-t, t)


@dataclass
class SpecificMaps:
    """Per image: the map shown ``maps [B, H, W]``, the contrast before shrinking ``contrast``, the
    threshold applied ``level [B]`` (``(1 - p_v) tau``), the alternative's weights ``alternative [B, V]``
    and the reading of the value ``p_value [B]``."""

    maps: Tensor
    contrast: Tensor
    level: Tensor
    alternative: Tensor
    p_value: Tensor


def shrink_level(values: Tensor, p: Tensor, value: Tensor) -> Tensor:
    """``[B]``: how far a value's map is shrunk, ``(1 - p_v) tau`` (step 5), from every value's map
    ``values [B, V, H, W]``, the reading ``p [B, V]`` and the value ``value [B]`` (indices)."""
    return null_level(values, p) * (1 - p[torch.arange(values.shape[0]), value])


def specific_maps(values: Tensor, p: Tensor, value: Tensor, own: Tensor | None = None) -> SpecificMaps:
    """Value-specific maps (module text) from every value's map ``values [B, V, H, W]``, the images'
    reading ``p [B, V]`` and the value mapped ``value [B]`` (indices). ``own [B, H, W]``: the map of a
    text standing for that value (a free text), used in place of ``values[:, value]``."""
    rows = torch.arange(values.shape[0])
    value = value.long().cpu()
    values, p = values.float(), p.float().to(values.device)
    a = alternatives(p, value)
    own = values[rows, value] if own is None else own.float()
    contrast = own - torch.einsum("bv,bvhw->bhw", a, values)
    level = shrink_level(values, p, value)
    return SpecificMaps(shrink(contrast, level), contrast, level, a, p[rows, value])


@dataclass
class ValueContext:
    """What a value-specific map needs besides the direction it explains: every value's direction
    ``classes [V, D]`` (e.g. a classifier's rows for one feature), the images' reading ``reading [B, V]``
    and the value each image is mapped for, ``value [B]`` (indices)."""

    classes: Tensor
    reading: Tensor
    value: Tensor

    def rows(self, start: int, stop: int) -> ValueContext:
        """The context of images ``start:stop``."""
        return ValueContext(self.classes, self.reading[start:stop], self.value[start:stop])

    def candidates(self) -> Tensor:
        """Indices of the values the batch's maps need: each image's mapped value and its
        ``NULL_VALUES + 1`` most probable ones (all of them when there are few)."""
        k = min(self.reading.shape[1], NULL_VALUES + 1)
        top = self.reading.topk(k, dim=-1).indices.flatten()
        return torch.unique(torch.cat([top.cpu(), self.value.long().cpu()]))
