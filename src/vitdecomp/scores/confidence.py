"""How sure each score is: :func:`score_confidence`.

A bootstrap percentile interval over images for every component x feature score, and a null: the
same score for ``n_null`` *null features*; ``p = (1 + #null >= score) / (1 + n_null)``. The null
features are groups of as many real texts drawn at random from a vocabulary (``null_pool``: an
analysis draws them from the general vocabulary), so a component is significant when it matters more
for this feature than for random real words. Without a pool they are the feature's description
embeddings turned by random rotations of CLIP space (same cosines, same subspace size): a weak null,
since random directions carry almost no image variance and any real text beats them. With a pool,
a feature must also be *present* in the images (:mod:`vitdecomp.scores.presence`): in a feature the
images do not show, no component is significant.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from vitdecomp.align import Aligner
from vitdecomp.scores.functions import Projected
from vitdecomp.scores.presence import FeaturePresence, feature_presence, vocabulary_groups
from vitdecomp.scores.registry import Score, get_score
from vitdecomp.scores.tables import Projections, json_float32, project_features
from vitdecomp.store import RowSource, as_rows


def random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix ``[d, d]`` (QR of a Gaussian with the signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def null_features(
    feature_emb: Mapping[str, torch.Tensor], n_null: int, seed: int = 0, pool: torch.Tensor | None = None
) -> dict[str, list[torch.Tensor]]:
    """``n_null`` null versions of every feature: ``n_null`` groups of as many texts of ``pool [V, d]``
    (embeddings of real texts; the feature's own left out), or without a pool its description
    embeddings turned by a random rotation of CLIP space (``T Q^T``: the same number of descriptions,
    pairwise cosines and subspace size, pointing in random directions)."""
    g = torch.Generator().manual_seed(seed)
    if pool is not None:
        return {
            f: list(vocabulary_groups(pool.to(t), t.shape[0], n_null, g, t).unbind(0)) for f, t in feature_emb.items()
        }
    out: dict[str, list[torch.Tensor]] = {f: [] for f in feature_emb}
    d = next(iter(feature_emb.values())).shape[1]
    for _ in range(n_null):
        q = random_rotation(d, g)
        for f, t in feature_emb.items():
            out[f].append((t.double() @ q.T).to(t.dtype))
    return out


@dataclass
class ScoreConfidence:
    """How sure each score of ``method`` is, per feature (rows) and component (columns):

    ``low``/``high [F, C]``: the bootstrap percentile interval at ``level`` (images resampled with
    replacement ``n_boot`` times); ``null_mean``/``null_high [F, C]``: the mean and the largest score
    over ``n_null`` null features (:func:`null_features`, described by ``null``); ``p_value [F, C]`` =
    ``(1 + #{null >= score}) / (1 + n_null)``: with ``n_null = 19`` a score above every null draw has
    ``p = 0.05``; ``presence``: the features' presence test (``None``: not tested), a component of an
    absent feature is never significant."""

    method: str
    features: list[str]
    labels: list[str]
    score: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    null_mean: torch.Tensor
    null_high: torch.Tensor
    p_value: torch.Tensor
    n_boot: int
    n_null: int
    level: float
    null: str = ""
    presence: FeaturePresence | None = None

    def significant(self, alpha: float = 0.05) -> torch.Tensor:
        """``[F, C]`` booleans: the score is above its null at ``alpha`` and the feature is present."""
        above = self.p_value <= alpha + 1e-9
        if self.presence is None:
            return above
        present = torch.tensor([self.presence.present.get(f, True) for f in self.features])
        return above & present[:, None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings, then ``{feature: {label: {score, low, high, null_mean, null_high,
        p, significant}}}`` under ``"scores"``."""
        cells = {}
        sig = self.significant()
        for i, f in enumerate(self.features):
            cells[f] = {
                lab: {
                    "score": json_float32(self.score[i, j]),
                    "low": json_float32(self.low[i, j]),
                    "high": json_float32(self.high[i, j]),
                    "null_mean": json_float32(self.null_mean[i, j]),
                    "null_high": json_float32(self.null_high[i, j]),
                    "p": round(float(self.p_value[i, j]), 6),
                    "significant": bool(sig[i, j]),
                }
                for j, lab in enumerate(self.labels)
            }
        head = {"method": self.method, "n_boot": self.n_boot, "n_null": self.n_null, "level": self.level}
        return {**head, "null": self.null, "scores": cells}


def _bootstrap(
    proj: Projections, method: str, features: list[str], n_boot: int, level: float, seed: int, progress: bool = False
):
    """Percentile interval ``(low, high) [F, C]`` over ``n_boot`` resamples of the images, each a
    multinomial count per image. For the per-image scores (``ablation``, ``text_probe``) the mean an
    ablated part is replaced by (and ``text_probe``'s probe and normaliser) is held at its value over all
    images; the per-image effects are resampled. A score with neither per-image effects nor a
    ``resample`` function is computed again on every resample (:func:`_recomputed`). No resamples: NaN."""
    if n_boot == 0:
        nan = torch.full((len(features), len(proj.labels)), float("nan"), dtype=torch.float64)
        return nan, nan
    record, draws = get_score(method), []
    w = resample_counts(len(proj), n_boot, seed)
    for f in tqdm(features, desc=f"bootstrap ({method})", unit="feature", leave=False, disable=not progress):
        p = proj.view(method, f)
        resampled = record.resampled(p, w)
        draws.append(resampled if resampled is not None else _recomputed(record, p, n_boot, seed))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo_hi = torch.quantile(torch.stack(draws, 1), q, dim=0)  # over [B, F, C]
    return lo_hi[0], lo_hi[1]


#: What the null features are, as ``results.json`` states it.
NULL_ABOUT = {
    "texts": "random groups of as many real texts of the general vocabulary (the feature's own left out)",
    "rotations": "random rotations of the feature's description embeddings",
}
#: Most bytes the null projections of one pass may take; more null draws take more passes.
NULL_PASS_BYTES = 256 << 20


def _null_scores(
    source: RowSource,
    aligner: Aligner,
    nulls: Mapping[str, list[torch.Tensor]],
    methods: list[str],
    batch_size: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Each method's scores for the null features ``nulls[feature] = [draw [K, d]]``: ``{method:
    [n_null, F, C]}``, the draws projected in groups of at most :data:`NULL_PASS_BYTES` per pass over
    the rows (their projections and, for the scores that need them, their per-value sums); ``progress``:
    one bar over every pass's images."""
    names = list(nulls)
    n_null = len(nulls[names[0]])
    records = [get_score(m) for m in methods]
    width = sum(t[0].shape[0] for t in nulls.values()) * len({r.kind for r in records})  # columns per draw
    rows = as_rows(source)
    n, c = len(rows), aligner.n_components
    per_draw = n * c * width * 4 if any(r.projections for r in records) else 0
    if any(r.needs_values for r in records):
        per_draw += width * c * rows.shapes["contributions"][-1] * 8  # ValueSums [K, C, D] per feature
    per_pass = max(1, NULL_PASS_BYTES // max(1, per_draw))
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    passes = range(0, n_null, per_pass)
    desc = f"null features ({n_null}, {len(passes)} pass(es))"
    with tqdm(total=n * len(passes), desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for start in passes:
            draws = range(start, min(start + per_pass, n_null))
            group = {f"{f}\x00{j}": nulls[f][j] for j in draws for f in names}
            proj = project_features(
                source, aligner, group, methods, batch_size=batch_size, dtype=torch.float32, bar=bar
            )
            for m in methods:
                out[m] += [torch.stack([proj.score(m, f"{f}\x00{j}") for f in names]) for j in draws]
    return {m: torch.stack(v) for m, v in out.items() if v}


@dataclass(frozen=True)
class Resampling:
    """How a score's confidence is measured: ``n_boot`` bootstrap resamples of the images, ``n_null``
    null features, the interval's ``level`` and the ``seed`` of both draws."""

    n_boot: int = 100
    n_null: int = 19
    level: float = 0.95
    seed: int = 0


def score_confidence(
    source: RowSource,
    aligner: Aligner,
    feature_emb: Mapping[str, torch.Tensor],
    methods: str | Sequence[str] = ("invariant",),
    resampling: Resampling | None = None,
    *,
    null_pool: torch.Tensor | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, ScoreConfidence]:
    """Bootstrap intervals over images and a null for every component x feature score of each
    method (:class:`ScoreConfidence`; how many draws: ``resampling``): one pass over the rows for the
    features themselves (their projections held as float32, resampled in memory), then passes for the
    null features (bounded memory, see :func:`_null_scores`): groups of real texts of ``null_pool [V,
    d]`` (and then the features' presence test), or random rotations without one (module text)."""
    r = resampling or Resampling()
    n_boot, n_null, level, seed = r.n_boot, r.n_null, r.level, r.seed
    methods = [methods] if isinstance(methods, str) else list(methods)
    names = list(feature_emb)
    proj = project_features(
        source, aligner, feature_emb, methods, batch_size=batch_size, dtype=torch.float32, progress=progress
    )
    nulls = {}
    if n_null:
        drawn = null_features(feature_emb, n_null, seed, null_pool)
        nulls = _null_scores(source, aligner, drawn, methods, batch_size, progress)
    presence = None
    if null_pool is not None:
        presence = feature_presence(source, feature_emb, null_pool, aligner, seed=seed, batch_size=batch_size)
    about = NULL_ABOUT["rotations" if null_pool is None else "texts"]
    out = {}
    for m in methods:
        obs = torch.stack([proj.score(m, f) for f in names])  # [F, C]
        null = nulls.get(m, torch.full_like(obs, float("nan"))[None])  # [n_null, F, C]
        low, high = _bootstrap(proj, m, names, n_boot, level, seed, progress)
        p = (1 + (null >= obs[None]).sum(0)) / (1 + n_null)
        stats = (obs, low, high, null.mean(0), null.amax(0))
        out[m] = ScoreConfidence(
            m, names, proj.labels, *(x.float() for x in stats), p.double(), n_boot, n_null, level, about, presence
        )
    return out


def resample_draws(n: int, n_boot: int, seed: int) -> Iterator[torch.Tensor]:
    """The bootstrap's resamples in turn: ``n_boot`` draws of ``n`` image rows with replacement
    ``[n]`` each, from one generator seeded ``seed`` (the rows of ``torch.randint(0, n, (n_boot, n))``:
    one at a time, so that no ``[n_boot, n]`` index array is held)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_boot):
        yield torch.randint(0, n, (n,), generator=g)


def resample_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """``[n_boot, n]`` float32: how often each image is drawn in each resample (:func:`resample_draws`;
    small integers, exact in float32)."""
    w = torch.zeros(n_boot, n)
    for b, rows in enumerate(resample_draws(n, n_boot, seed)):
        w[b] = torch.bincount(rows, minlength=n).float()
    return w


def _recomputed(record: Score, p: Projected, n_boot: int, seed: int) -> torch.Tensor:
    """``[B, C]``: ``record``'s score on each resample of the images (:func:`resample_draws`)."""
    out = []
    for rows in resample_draws(p.u.shape[0], n_boot, seed):
        probe = None if p.probe is None else tuple(x[rows] for x in p.probe)
        out.append(record.compute(Projected(p.u[rows], p.whole[rows], p.norm[rows], probe)).double())
    return torch.stack(out)
