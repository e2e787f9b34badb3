"""Mean-ablation of a decomposition's components, and the analysed components the ablation
applications (``vitdecomp debias``, ``vitdecomp ablate``) read.

The decomposition is exact, ``z = sum_i c_i`` (``contributions [N, C, D]``, see
:func:`vitdecomp.decompose`). Mean-ablating a set ``S`` of components replaces each ``c_i``
(``i in S``) by its mean ``m_i`` over a *reference* split (the training images)::

    z_S = z - sum_{i in S} (c_i - m_i)

and a frozen head then re-reads ``z_S``: what the head loses is what those parts carried for it.
:class:`MeanAblation` holds the contributions and the means and gives ``z_S`` for one set, or for
every prefix of a ranking in turn (:meth:`MeanAblation.prefixes`: the k curve).

:func:`analysed_components` runs the pipeline's stages on an image set (the keyed store of
decompositions and reader embeddings, the cached or trained aligner; see
:mod:`vitdecomp.pipeline.stages`) and returns the contributions in memory, their labels (with the
layer each part belongs to), and what scores them: :meth:`AnalysedComponents.scores` embeds a
feature set with the reader's text tower and scores every component with the applications' default
score (:data:`vitdecomp.scores.DEFAULT_SCORE`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitdecomp.align import Aligner
from vitdecomp.api import decompose
from vitdecomp.checks import default_device
from vitdecomp.components import ComponentLabel
from vitdecomp.imageset import ImageSource
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.fill import configured_store, readable_rows
from vitdecomp.pipeline.model_pair import Models, configured_models
from vitdecomp.pipeline.stages import configured_aligner
from vitdecomp.scores import DEFAULT_SCORE, ScoreTable, embed_features, score_features
from vitdecomp.text import DEFAULT_TEMPLATES, WORLD_TEMPLATES, TextEncoder

#: Row selection: a slice, integer indices or a boolean mask.
RowIndex = slice | np.ndarray | Sequence[int] | torch.Tensor


@dataclass
class MeanAblation:
    """Contributions ``[N, C, D]`` of an image set and each component's mean ``[C, D]`` over a
    reference split; ``labels`` names the ``C`` components."""

    contributions: torch.Tensor
    means: torch.Tensor
    labels: list[str]

    @classmethod
    def fit(cls, contributions: torch.Tensor, labels: Sequence[str], reference: RowIndex | None = None) -> MeanAblation:
        """Means over the ``reference`` rows (all rows when ``None``)."""
        c = contributions.float()
        ref = c if reference is None else c[_rows(reference)]
        if ref.shape[0] == 0:
            raise ValueError("mean-ablation needs at least one reference image")
        return cls(c, ref.mean(0), list(labels))

    @property
    def n_components(self) -> int:
        return int(self.contributions.shape[1])

    def index(self, names: Sequence[str]) -> list[int]:
        """Positions of the named components (unknown names raise ``KeyError``)."""
        where = {lab: i for i, lab in enumerate(self.labels)}
        return [where[n] for n in names]

    def whole(self, rows: RowIndex | None = None) -> torch.Tensor:
        """The unablated representation ``[N', D]`` (the sum of the parts)."""
        return self._c(rows).sum(1)

    def ablate(self, components: Sequence[int], rows: RowIndex | None = None) -> torch.Tensor:
        """``z_S [N', D]`` with the components at positions ``components`` mean-ablated."""
        c = self._c(rows)
        idx = torch.as_tensor(list(components), dtype=torch.long)
        return c.sum(1) - (c[:, idx] - self.means[idx]).sum(1)

    def prefixes(self, order: Sequence[int], ks: Sequence[int], rows: RowIndex | None = None) -> Iterator[torch.Tensor]:
        """For every ``k`` of ``ks`` (ascending, ``0 <= k <= len(order)``), in turn: the representation
        ``[N', D]`` with the first ``k`` components of ``order`` mean-ablated. One running sum over
        ``order``: at most two ``[N', D]`` arrays besides the contributions, whatever ``len(ks)``."""
        ks = list(ks)
        if ks != sorted(ks) or (ks and not 0 <= ks[0] <= ks[-1] <= len(order)):
            raise ValueError(f"ks must be ascending within 0..{len(order)}, got {ks}")
        c = self._c(rows)
        whole = c.sum(1)
        removed, done = torch.zeros_like(whole), 0
        for k in ks:
            for i in order[done:k]:
                removed += c[:, i] - self.means[i]
            done = max(done, k)
            yield whole - removed

    def _c(self, rows: RowIndex | None) -> torch.Tensor:
        return self.contributions if rows is None else self.contributions[_rows(rows)]


def _rows(rows: RowIndex) -> slice | torch.Tensor:
    if isinstance(rows, slice):
        return rows
    t = torch.as_tensor(np.asarray(rows))
    return t if t.dtype == torch.bool else t.long()


@dataclass
class AnalysedComponents:
    """An image set run through the pipeline's stages, in memory: ``contributions [N, C, D]`` of the
    subject, ``parts`` (one :class:`~vitdecomp.components.ComponentLabel` per component, with its
    layer), the aligner into the reader's CLIP space, the reader's text encoder and its image
    embeddings ``clip [N, d_clip]`` (what the scores' zero-shot labels read; ``None``: the aligned whole)."""

    source: ImageSource
    models: Models
    contributions: torch.Tensor
    parts: list[ComponentLabel]
    aligner: Aligner
    encoder: TextEncoder
    templates: tuple[str, ...]
    progress: bool = True
    clip: torch.Tensor | None = None

    @property
    def labels(self) -> list[str]:
        return [p.name for p in self.parts]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings ``[T, d_clip]`` under the run's prompt templates."""
        return self.encoder.encode(list(texts), self.templates)

    def scores(
        self, features: Mapping[str, Sequence[str]], rows: RowIndex | None = None, method: str = DEFAULT_SCORE
    ) -> ScoreTable:
        """Every component's score (``method``, default the applications' default) for every feature,
        over the ``rows`` images (all by default): a :class:`~vitdecomp.scores.ScoreTable` ``[F, C]``."""
        return self.score_tables(features, rows, (method,))[method]

    def score_tables(
        self, features: Mapping[str, Sequence[str]], rows: RowIndex | None, methods: Sequence[str]
    ) -> dict[str, ScoreTable]:
        """:meth:`scores` for several methods at once (one pass over the images): ``{method: table}``."""
        emb = embed_features(self.embed, features)
        index = slice(None) if rows is None else _rows(rows)
        c = self.contributions[index] if self.clip is None else (self.contributions[index], self.clip[index])
        return score_features(c, self.aligner, emb, methods=tuple(methods), progress=self.progress)


def analysed_components(cfg: AnalysisConfig, source: ImageSource) -> AnalysedComponents:
    """The store, aligner and text encoder of an analysis of ``source`` with ``cfg``'s models and
    caches: the same cached store and aligner ``vitdecomp analyze`` uses (stages of
    :mod:`vitdecomp.pipeline.stages`), without the descriptions, confidence and report."""
    device = default_device(cfg.device)
    models = configured_models(cfg, device)
    built = configured_store(cfg, models, source, device)
    rows = readable_rows(built.store)
    aligned = configured_aligner(cfg, rows, models, device)
    batch = rows.batch(slice(None))
    contributions, clip = batch["contributions"].float().cpu(), batch["clip"].float().cpu()
    with torch.no_grad():
        first = models.subject.preprocess(source.image(0))[None].to(device)
        parts = decompose(models.subject, first, start_layer=cfg.start_layer).labels
    if [p.name for p in parts] != list(rows.labels or []):
        raise RuntimeError("the store's component layout differs from the model's decomposition")
    templates = tuple(cfg.templates) if cfg.templates else (WORLD_TEMPLATES if source.is_world else DEFAULT_TEMPLATES)
    encoder = TextEncoder.from_loaded(models.reader, cache_dir=cfg.cache_path / "text", device=device)
    return AnalysedComponents(
        source, models, contributions, list(parts), aligned.aligner.to("cpu"), encoder, templates, cfg.progress, clip
    )
