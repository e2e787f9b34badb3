"""Segmentation metrics of relevance maps against object masks, the same for every map method.

One threshold rule for every method (Chefer et al.'s ImageNet-segmentation evaluation, which the
paper's numbers follow): each map is min-max normalised to ``[0, 1]`` per image and a pixel is
*object* when its normalised relevance is above the map's own mean. On those binary masks:

* **pixel accuracy** — correct pixels / all pixels, over the whole set;
* **mIoU** — per class (object, background) the dataset-level IoU (intersections summed over the
  set / unions summed over the set), averaged over the two classes;
* **cumulative foreground IoU** — the object class's dataset-level IoU alone, which is what the
  published code reported under the name "mIoU";
* **mAP** — per image, the average precision of the raw relevance ranking the object pixels
  (scikit-learn's ``average_precision_score``; no threshold), averaged over images that have both
  object and background pixels;
* **mAP (object + background)** — the mAP the published ImageNet-segmentation numbers report
  (Chefer et al.'s ``get_ap_scores``, which TextSpan's code reuses): per image, the min-max
  normalised map scores the object pixels and one minus it the background pixels, both rankings
  pooled into one average precision (a constant map scores 0 in both); averaged over every image.
* **pointing game** — the share of images whose map's highest pixel is on the object (ties: the first
  pixel in row order); a map with no positive value points nowhere (a miss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import Tensor

#: The threshold rule, as written in every output.
THRESHOLD_RULE = "per image: min-max normalise to [0, 1], object where relevance > the map's mean"


@dataclass(frozen=True)
class SegMetrics:
    """A method's scores over a set of images (see the module text for definitions)."""

    pixel_accuracy: float
    miou: float
    iou_object: float
    iou_background: float
    cumulative_foreground_iou: float
    mean_ap: float
    n_images: int
    n_ap_images: int
    pointing: float = float("nan")
    mean_ap_two_class: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def binarize(maps: Tensor) -> Tensor:
    """``maps [N, H, W]`` -> boolean object masks ``[N, H, W]`` under :data:`THRESHOLD_RULE`
    (a constant map gives no object pixels)."""
    flat = maps.reshape(maps.shape[0], -1).double()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = (flat - lo) / (hi - lo).clamp_min(1e-30)
    return (norm > norm.mean(1, keepdim=True)).reshape(maps.shape)


@dataclass
class SegAccumulator:
    """Running sums for :class:`SegMetrics`, fed batch by batch (maps need not be kept)."""

    inter: np.ndarray = None  # type: ignore[assignment]  # [2] object, background
    union: np.ndarray = None  # type: ignore[assignment]
    correct: int = 0
    pixels: int = 0
    n_images: int = 0
    ap_sum: float = 0.0
    n_ap: int = 0
    hits: int = 0
    ap_two_class_sum: float = 0.0

    def __post_init__(self) -> None:
        self.inter, self.union = np.zeros(2), np.zeros(2)

    def add(self, maps: Tensor, masks: Tensor) -> None:
        """``maps [N, H, W]`` relevance (any scale, any sign) and ``masks [N, H, W]`` bool (True = object)."""
        masks = masks.bool()
        pred = binarize(maps)
        for c, (p, t) in enumerate(((pred, masks), (~pred, ~masks))):
            self.inter[c] += int((p & t).sum())
            self.union[c] += int((p | t).sum())
        self.correct += int((pred == masks).sum())
        self.pixels += masks.numel()
        self.n_images += masks.shape[0]
        for m, t in zip(maps.reshape(maps.shape[0], -1), masks.reshape(masks.shape[0], -1), strict=True):
            self.hits += int(bool(m.max() > 0) and bool(t[m.argmax()]))
            if t.any() and not t.all():
                self.ap_sum += float(average_precision_score(t.numpy(), m.double().numpy()))
                self.n_ap += 1
            self.ap_two_class_sum += two_class_ap(m, t)

    def result(self) -> SegMetrics:
        iou = self.inter / np.maximum(self.union, 1)
        return SegMetrics(
            pixel_accuracy=self.correct / max(self.pixels, 1),
            miou=float(iou.mean()),
            iou_object=float(iou[0]),
            iou_background=float(iou[1]),
            cumulative_foreground_iou=float(iou[0]),
            mean_ap=self.ap_sum / max(self.n_ap, 1),
            n_images=self.n_images,
            n_ap_images=self.n_ap,
            pointing=self.hits / max(self.n_images, 1),
            mean_ap_two_class=self.ap_two_class_sum / max(self.n_images, 1),
        )


def two_class_ap(relevance: Tensor, mask: Tensor) -> float:
    """One image's average precision as the published ImageNet-segmentation protocol computes it:
    ``relevance [P]`` min-max normalised to ``n`` ranks the object pixels of ``mask [P]`` and ``1 - n``
    the background pixels, pooled into one ranking of ``2P`` scores (a constant map: every score 0)."""
    m = relevance.double()
    lo, hi = m.min(), m.max()
    norm = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    background = 1 - norm if hi > lo else torch.zeros_like(m)
    truth = torch.cat([~mask, mask]).numpy()
    return float(np.nan_to_num(average_precision_score(truth, torch.cat([background, norm]).numpy())))


def segmentation_metrics(maps: Tensor, masks: Tensor) -> SegMetrics:
    """Scores of ``maps [N, H, W]`` against ``masks [N, H, W]`` (True = object) in one call."""
    acc = SegAccumulator()
    acc.add(torch.as_tensor(maps), torch.as_tensor(masks))
    return acc.result()
