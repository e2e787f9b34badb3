"""The ``flow`` score: where a feature flows through the parts, signed, read label-free in the
subject's own space.

Every image is labelled by the reader's zero-shot reading of the feature (the description its
embedding is closest to; :func:`reading_labels`). Per value ``k`` the mean contribution of every part
``mu_ik = mean_{y=k} c_i(x)`` ``[K, C, D]`` (the subject's own space, no aligner), centred over the
values that occur (each value weighs the same); with ``mu_k = sum_i mu_ik`` (the whole's value mean)

    ``flow_i = sum_k <mu_ik, mu_k> / sum_k ||mu_k||^2``

(:func:`flow_share`). It sums to 1 over the parts and is signed: a part whose value means point
against the whole's works against the feature (a *suppressor*, negative). When every part's value
effect is additive, it equals the counterfactual flow share of ``vitdecomp validate`` over uniformly
drawn pairs of values exactly: ``sum_{k,k'} <a_k - a_k', b_k - b_k'> = 2K sum_k <a_k - abar, b_k - bbar>``.

Its sufficient statistics are the per-value sums of the contributions and the counts
(:class:`ValueSums`, ``[K, C, D]`` and ``[K]``): one pass over the rows, memory flat in the number of
images. Its bootstrap is linearised: every image's first-order influence on the score
(:func:`flow_influence`, a second pass over the rows, batch by batch) is resampled, so the
``B`` resamples take ``[B, C]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


def reading_labels(reading: torch.Tensor) -> torch.Tensor:
    """Each image's value: the description its embedding projects on most, ``reading [N, K]`` ->
    ``[N]`` (the projections on the unit description embeddings; the argmax is the zero-shot label)."""
    return reading.argmax(-1)


@dataclass
class ValueSums:
    """Per value of a feature, the sum of every part's contribution over the images labelled with it
    (``sums [K, C, D]``, float64) and their number (``counts [K]``)."""

    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, k: int, c: int, d: int) -> ValueSums:
        return cls(torch.zeros(k, c, d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def add(self, contributions: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: ``contributions [b, C, D]`` and each image's value ``labels [b]``."""
        y = labels.long().cpu()
        self.sums.index_add_(0, y, contributions.double().cpu())
        self.counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))

    @property
    def n(self) -> int:
        return int(self.counts.sum())


@dataclass
class _Means:
    """The value means the score and its influence read: ``a [K', C, D]`` (parts), ``t [K', D]`` (the
    whole), their centred versions, the values that occur ``present [K]``, ``counts [K']``, the
    denominator ``sum_k ||t~_k||^2`` and the score ``[C]``."""

    a: torch.Tensor
    a_c: torch.Tensor
    t: torch.Tensor
    t_c: torch.Tensor
    present: torch.Tensor
    counts: torch.Tensor
    den: torch.Tensor
    score: torch.Tensor


def _means(v: ValueSums) -> _Means:
    present = v.counts > 0
    counts = v.counts[present]
    a = v.sums[present] / counts[:, None, None]  # [K', C, D]
    a_c = a - a.mean(0)
    t, t_c = a.sum(1), a_c.sum(1)  # [K', D]
    den = t_c.square().sum()
    if len(counts) < 2 or den <= 1e-300:  # one value (or none): the feature does not vary
        score = torch.zeros(a.shape[1], dtype=torch.float64)
    else:
        score = (a_c * t_c[:, None]).sum((0, 2)) / den
    return _Means(a, a_c, t, t_c, present, counts, den, score)


def flow_share(v: ValueSums) -> torch.Tensor:
    """``[C]``: ``sum_k <mu_ik, mu_k> / sum_k ||mu_k||^2`` over the values that occur (module text);
    zeros when fewer than two values occur."""
    return _means(v).score


def flow_influence(v: ValueSums, contributions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[b, C]``: each image's first-order influence on :func:`flow_share` (the derivative of the
    score in the image's weight, times the number of images), from the finished sums ``v``, the
    image's parts ``contributions [b, C, D]`` and its value ``labels [b]``; its mean over the images
    is 0. With ``y`` the image's value, ``n_y`` its count, ``r = sum_i c_i``:
    ``N/n_y (<c_i - a_iy, t~_y> + <a~_iy, r - t_y> - 2 s_i <t~_y, r - t_y>) / den``."""
    return _influence(_means(v), v.n, contributions, labels)


def _influence(m: _Means, n: int, contributions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`flow_influence` from the value means ``m`` of ``n`` images (computed once per score)."""
    if not bool(m.score.abs().sum() > 0):
        return torch.zeros(len(labels), m.a.shape[1], dtype=torch.float64)
    slot = torch.cumsum(m.present.long(), 0) - 1  # value -> its row among the values that occur
    y = slot[labels.long().cpu()]
    c = contributions.double().cpu()
    r = c.sum(1)  # [b, D]
    t_c, t = m.t_c[y], m.t[y]  # [b, D]
    own = (c * t_c[:, None]).sum(-1) - (m.a[y] * t_c[:, None]).sum(-1)  # <c_i - a_iy, t~_y>  [b, C]
    whole = (m.a_c[y] * (r - t)[:, None]).sum(-1)  # <a~_iy, r - t_y>  [b, C]
    norm = ((r - t) * t_c).sum(-1)  # <t~_y, r - t_y>  [b]
    scale = n / m.counts[y] / m.den  # [b]
    return scale[:, None] * (own + whole - 2 * m.score[None] * norm[:, None])


def flow_resampled(
    v: ValueSums, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
) -> torch.Tensor:
    """The score under image weights ``weights [B, N]`` (bootstrap counts, mean 1), linearised:
    ``s + (1/N) sum_n (w_bn - 1) infl_n`` ``[B, C]``, the influences computed batch by batch from
    ``batches`` (each image's ``(contributions [b, C, D], labels [b])``, in row order)."""
    m = _means(v)  # once, not once per batch
    s = m.score
    out = torch.zeros(weights.shape[0], len(s), dtype=torch.float64)
    start = 0
    for c, y in batches:
        w = weights[:, start : start + len(y)].double() - 1.0
        out += w @ _influence(m, v.n, c, y)
        start += len(y)
    return s[None] + out / max(start, 1)


class FeatureValues:
    """The :class:`ValueSums` of several features over one pass of the rows: each image labelled by
    its reading of each feature (:meth:`add`), every image's labels kept (``[N]`` per feature, for
    the bootstrap's second pass)."""

    def __init__(self, feature_emb: Mapping[str, torch.Tensor]) -> None:
        self.texts = {f: torch.nn.functional.normalize(t.double().cpu(), dim=-1) for f, t in feature_emb.items()}
        self.values: dict[str, ValueSums] = {}
        self._labels: dict[str, list[torch.Tensor]] = {f: [] for f in self.texts}

    def add(self, contributions: torch.Tensor, reading: torch.Tensor) -> None:
        """One batch: the parts ``[b, C, D]`` and each image's embedding in the reader's space ``[b, d]``
        (its reading: the reader's own image embedding, or the aligned whole)."""
        z = reading.double().cpu()
        contributions = contributions.double().cpu()  # once per batch, not once per feature
        for f, t in self.texts.items():
            y = reading_labels(z @ t.T)
            if f not in self.values:
                self.values[f] = ValueSums.zeros(t.shape[0], *contributions.shape[1:])
            self.values[f].add(contributions, y)
            self._labels[f].append(y.to(torch.int16))

    def labels(self, feature: str) -> torch.Tensor:
        """``[N]``: every image's value of ``feature``."""
        return torch.cat(self._labels[feature]).long()
