"""Is a feature in the images at all? :func:`feature_presence`.

A feature whose values the images do not show (animals in a folder of coloured shapes) still labels
every image by its zero-shot reading; those labels then follow whatever the images do vary in, and a
score can mark parts significant for it. The test: every image's reading embedding (the reader's own
image embedding, or the aligned whole without one, :func:`vitdecomp.scores.tables.reading`; unit
length) and its label under the feature; the statistic is the share of the embeddings' variance
between the labels (``R^2``: ``sum_k n_k ||m_k - m||^2 / sum_x ||z_x - m||^2``). The null: the same
statistic for ``n_draws`` groups of as many real texts drawn at random from a vocabulary (the general
one in an analysis; the feature's own descriptions left out). ``p = (1 + #{null >= R^2}) / (1 +
n_draws)``; the feature is *present* when ``p <= alpha``. More values separate more images, so the
null's groups have the feature's size. One pass over the rows, memory flat in the number of images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vitdecomp.align import Aligner
from vitdecomp.scores.tables import reading
from vitdecomp.store import RowSource, as_rows

#: Draws of the presence null (``p`` resolves 0.01) and the level a present feature passes.
N_DRAWS = 99
ALPHA = 0.05


def vocabulary_groups(
    pool: torch.Tensor, k: int, n: int, generator: torch.Generator, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` groups of ``k`` distinct rows of ``pool [V, d]`` drawn at random, leaving out the rows
    within cosine 0.999 of any row of ``exclude [E, d]`` (a feature's own descriptions): ``[n, k, d]``."""
    keep = torch.ones(len(pool), dtype=torch.bool)
    if exclude is not None and len(exclude):
        cos = F.normalize(pool.double(), dim=-1) @ F.normalize(exclude.double().to(pool.device), dim=-1).T
        keep = (cos < 0.999).all(1).cpu()
    rows = torch.nonzero(keep)[:, 0]
    if len(rows) < k:
        raise ValueError(f"a vocabulary of {len(rows)} other texts cannot make groups of {k}")
    picks = torch.stack([rows[torch.randperm(len(rows), generator=generator)[:k]] for _ in range(n)])
    return pool[picks.to(pool.device)]


@dataclass
class FeaturePresence:
    """Whether each feature separates the images more than random groups of real texts do:
    ``statistic [F]`` (``R^2`` of the reading embeddings between the feature's labels), the null's
    ``null_mean`` / ``null_high [F]`` over ``n_draws`` groups, ``p [F]`` and ``present`` at ``alpha``."""

    features: list[str]
    statistic: torch.Tensor
    null_mean: torch.Tensor
    null_high: torch.Tensor
    p: torch.Tensor
    n_draws: int
    alpha: float = ALPHA

    @property
    def present(self) -> dict[str, bool]:
        return {f: bool(self.p[i] <= self.alpha + 1e-9) for i, f in enumerate(self.features)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{feature: {r2, null_mean, null_high, p, present}}`` and the settings."""
        cells = {
            f: {
                "r2": float(self.statistic[i]),
                "null_mean": float(self.null_mean[i]),
                "null_high": float(self.null_high[i]),
                "p": round(float(self.p[i]), 6),
                "present": self.present[f],
            }
            for i, f in enumerate(self.features)
        }
        about = "R^2 of the reading embeddings between the feature's zero-shot labels vs random groups of real texts"
        return {"test": about, "n_draws": self.n_draws, "alpha": self.alpha, "features": cells}


class _Between:
    """Running per-label sums of unit embeddings for ``G`` groups of ``K`` texts ``[G, K, d]``."""

    def __init__(self, texts: torch.Tensor) -> None:
        self.texts = F.normalize(texts.double().cpu(), dim=-1)  # [G, K, d]
        g, k, d = self.texts.shape
        self.sums = torch.zeros(g, k, d, dtype=torch.float64)
        self.counts = torch.zeros(g, k, dtype=torch.float64)

    def add(self, z: torch.Tensor) -> None:
        onehot = F.one_hot(torch.einsum("bd,gkd->bgk", z, self.texts).argmax(-1), self.texts.shape[1]).double()
        self.sums += torch.einsum("bgk,bd->gkd", onehot, z)
        self.counts += onehot.sum(0)

    def r2(self, total: torch.Tensor, square: torch.Tensor, n: int) -> torch.Tensor:
        """``[G]``: the between-label share of the variance (``total``: sum of z, ``square``: of ||z||^2)."""
        between = (self.sums.square().sum(-1) / self.counts.clamp_min(1)).sum(-1) - total.square().sum() / n
        return between / (square - total.square().sum() / n).clamp_min(1e-300)


@torch.no_grad()
def feature_presence(
    source: RowSource,
    feature_emb: Mapping[str, torch.Tensor],
    pool: torch.Tensor,
    aligner: Aligner | None = None,
    *,
    n_draws: int = N_DRAWS,
    seed: int = 0,
    batch_size: int = 256,
) -> FeaturePresence:
    """The presence test of every feature (module text) against ``n_draws`` groups of texts of
    ``pool [V, d]`` (embedded like the features); ``aligner`` gives the aligned whole for rows without
    the reader's embedding. One pass over the rows."""
    g = torch.Generator().manual_seed(seed)
    groups = {
        f: _Between(torch.cat([t[None].to(pool), vocabulary_groups(pool, t.shape[0], n_draws, g, t)]))
        for f, t in feature_emb.items()
    }
    rows = as_rows(source)
    # the reader's embedding where the rows hold it (the contributions, the largest array, are then not read)
    arrays = ("clip",) if "clip" in rows.shapes else ("contributions",)
    total, square, n = 0.0, 0.0, 0
    for b in rows.iter_batches(batch_size, arrays):
        whole = None
        if "clip" not in b and aligner is not None:
            whole = aligner.apply(b["contributions"]).double().sum(1) + aligner.bias.double()
        z = F.normalize(reading(b, whole).double().cpu(), dim=-1)
        for acc in groups.values():
            acc.add(z)
        total, square, n = total + z.sum(0), square + z.square().sum(), n + len(z)
    r2 = torch.stack([acc.r2(total, square, n) for acc in groups.values()])  # [F, 1 + n_draws]
    obs, null = r2[:, 0], r2[:, 1:]
    p = (1 + (null >= obs[:, None]).sum(1)) / (1 + n_draws)
    return FeaturePresence(list(groups), obs, null.mean(1), null.amax(1), p.double(), n_draws)
