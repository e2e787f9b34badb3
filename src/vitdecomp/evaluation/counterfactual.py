"""The counterfactual truth: where an attribute's change flows through the parts, from pairs of
world scenes identical but for that attribute. No labels read by a probe, no texts, no CLIP, no
ablation: it shares no machinery with any score.

Pairs (:func:`counterfactual_pairs`): the world renders ``n`` scenes of a seed, then the same scenes
again with one attribute set to another value (``make_scenes(..., fixed={attr: other values})``, the
other value drawn uniformly among the rest). For shape, colour and pattern the second render uses the
same random streams, so the two images are identical outside the object (outside the union of both
objects' masks for shape; colour and pattern keep the mask). For the background the generator draws the
new background's noise from the chunk's stream, so the pixel noise moves everywhere; the pair keeps the
object's pixels of the first image, and the two objects' masks must agree. Every pair is checked by
pixels (:func:`pair_violations`) and a pair that differs where it must not is dropped.

With ``dc_i = c_i(x') - c_i(x)`` and ``dr = sum_i dc_i`` (exact, the decomposition is complete):

``flow``
    ``E<dc_i, dr> / E||dr||^2``: part ``i``'s share of the representation's attribute-induced change
    (sums to 1 over the parts; negative: the part works against the change, a suppressor).
``response``
    ``E||dc_i||^2 / E||c_i(x) - c_i(y)||^2`` over unrelated pairs ``(x, y)`` (each first image with
    the next one): how much of the part's ordinary variation the attribute alone moves (unsigned, per
    part, not a share).

:func:`counterfactual_truth` is a function of (model, pairs) -> per-part values; other modules (a
sparse autoencoder's latents, say) may call :class:`FlowSums` directly with their own parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vitdecomp.api import decompose
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES, make_scenes


@dataclass
class Pairs:
    """Counterfactual pairs for one ``attribute``: ``first`` and ``second`` images ``[N, H, W, 3]``
    (uint8), the attribute's value in each (``before``, ``after`` ``[N]``), and how many drawn pairs the
    pixel check ``dropped``."""

    attribute: str
    first: np.ndarray
    second: np.ndarray
    before: np.ndarray
    after: np.ndarray
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.first)


def pair_violations(
    attribute: str, first: np.ndarray, second: np.ndarray, mask_first: np.ndarray, mask_second: np.ndarray
) -> np.ndarray:
    """``[N]`` booleans: the pair differs where it must not. Images ``[N, H, W, 3]``, object masks
    ``[N, H, W]``. Shape: any pixel outside both objects differs; colour and pattern: the object moved
    (masks differ) or any pixel outside it differs; background: the object moved or any of its pixels
    differ."""
    same = (first == second).all(-1)  # [N, H, W]
    if attribute == "background":
        return (mask_first != mask_second).any((1, 2)) | (~same & mask_first).any((1, 2))
    allowed = mask_first | mask_second
    bad = (~same & ~allowed).any((1, 2))
    if attribute != "shape":
        bad |= (mask_first != mask_second).any((1, 2))
    return bad


def counterfactual_pairs(n: int, seed: int, attribute: str, *, draw_seed: int = 0, size: int = 64) -> Pairs:
    """The first ``n`` scenes of world ``seed`` and the same scenes with ``attribute`` changed to
    another value (uniform among the rest, drawn with ``draw_seed``); checked by pixels, bad pairs
    dropped (see the module text)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {list(ATTRIBUTES)}, not {attribute!r}")
    first = make_scenes(n, seed=seed, size=size)
    k = len(ATTRIBUTES[attribute])
    before = first.attributes[attribute]
    after = (before + np.random.default_rng(draw_seed).integers(1, k, n)) % k
    second = make_scenes(n, seed=seed, size=size, fixed={attribute: after})
    images = second.images
    if attribute == "background":
        images = np.where(first.masks[..., None], first.images, second.images)
    bad = pair_violations(attribute, first.images, images, first.masks, second.masks)
    keep = ~bad
    return Pairs(attribute, first.images[keep], images[keep], before[keep], after[keep], int(bad.sum()))


@dataclass
class FlowSums:
    """Running sums over pairs, enough for the flow share and the response truth (memory ``[C]``): feed
    the parts of each batch's first and second images with :meth:`add`; even and odd pairs are also
    summed apart (the truth's split-half stability)."""

    n_parts: int
    inner: torch.Tensor = field(init=False)  # [2, C]: sum <dc_i, dr>, even / odd pairs
    change: torch.Tensor = field(init=False)  # [2]: sum ||dr||^2
    moved: torch.Tensor = field(init=False)  # [C]: sum ||dc_i||^2
    spread: torch.Tensor = field(init=False)  # [C]: sum ||c_i(x) - c_i(y)||^2 over unrelated pairs
    n: int = 0
    n_unrelated: int = 0

    def __post_init__(self) -> None:
        c = self.n_parts
        z = torch.zeros
        self.inner, self.change = z(2, c, dtype=torch.float64), z(2, dtype=torch.float64)
        self.moved, self.spread = z(c, dtype=torch.float64), z(c, dtype=torch.float64)

    def add(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """One batch: the parts ``[b, C, D]`` of the first and of the second images of ``b`` pairs."""
        first, second = first.double().cpu(), second.double().cpu()
        dc = second - first
        dr = dc.sum(1)  # [b, D]
        half = torch.arange(self.n, self.n + len(dc)) % 2
        inner = (dc * dr[:, None]).sum(-1)  # [b, C]
        for h in (0, 1):
            rows = half == h
            self.inner[h] += inner[rows].sum(0)
            self.change[h] += dr[rows].square().sum()
        self.moved += dc.square().sum((0, 2))
        if len(first) > 1:
            self.spread += (first - first.roll(1, 0)).square().sum((0, 2))
            self.n_unrelated += len(first)
        self.n += len(dc)

    def flow(self, half: int | None = None) -> np.ndarray:
        """``[C]``: ``E<dc_i, dr> / E||dr||^2`` (over every pair, or the even / odd ones)."""
        if half is None:
            inner, change = self.inner.sum(0), self.change.sum()
        else:
            inner, change = self.inner[half], self.change[half]
        return (inner / change.clamp_min(1e-300)).numpy()

    def response(self) -> np.ndarray:
        """``[C]``: ``E||dc_i||^2 / E||c_i(x) - c_i(y)||^2``."""
        moved = self.moved / max(self.n, 1)
        spread = self.spread / max(self.n_unrelated, 1)
        varies = spread > 1e-12 * spread.max().clamp_min(1e-300)  # constants (init, biases) respond 0
        return torch.where(varies, moved / spread.clamp_min(1e-300), torch.zeros_like(moved)).numpy()


@dataclass
class PartTruth:
    """The counterfactual truth of one attribute: ``flow [C]``, ``response [C]`` (the module text),
    ``flow_halves`` (the flow of the even and of the odd pairs), ``labels`` of the parts, ``n_pairs``
    used and ``dropped`` by the pixel check."""

    attribute: str
    labels: list[str]
    flow: np.ndarray
    response: np.ndarray
    flow_halves: tuple[np.ndarray, np.ndarray]
    n_pairs: int
    dropped: int


def _parts(model: LoadedModel, images: np.ndarray, device: str) -> tuple[torch.Tensor, list[str]]:
    x = torch.stack([model.preprocess(Image.fromarray(im)) for im in images]).to(device)
    with torch.no_grad():
        d = decompose(model, x)
    return d.contributions.cpu(), list(d.names)


def counterfactual_truth(model: LoadedModel, pairs: Pairs, *, batch_size: int = 128, device: str = "cpu") -> PartTruth:
    """The flow share and response truth of ``pairs.attribute`` for every part of ``model`` (both
    images of every pair decomposed, batch by batch; memory flat in the number of pairs)."""
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 counterfactual pairs for {pairs.attribute!r}, got {len(pairs)}")
    sums: FlowSums | None = None
    labels: list[str] = []
    for s in range(0, len(pairs), batch_size):
        a, labels = _parts(model, pairs.first[s : s + batch_size], device)
        b, _ = _parts(model, pairs.second[s : s + batch_size], device)
        sums = sums or FlowSums(a.shape[1])
        sums.add(a, b)
    assert sums is not None
    halves = (sums.flow(0), sums.flow(1))
    return PartTruth(pairs.attribute, labels, sums.flow(), sums.response(), halves, sums.n, pairs.dropped)


def counterfactual_truths(
    model: LoadedModel, n_pairs: int, seed: int, attributes: Sequence[str] = CORE_ATTRIBUTES, device: str = "cpu"
) -> dict[str, PartTruth]:
    """:func:`counterfactual_truth` of every attribute, ``n_pairs`` pairs of world ``seed`` each."""
    return {a: counterfactual_truth(model, counterfactual_pairs(n_pairs, seed, a), device=device) for a in attributes}
