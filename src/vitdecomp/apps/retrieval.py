"""Retrieval through chosen components, brute force over an analysed image set.

* By text: rank images by the cosine between a text embedding and the aligned sum of the top-k
  components for a feature (``k`` = :func:`vitdecomp.apps.analysis.auto_k`, ``--k`` overrides), or
  the whole aligned representation without a feature.
* By example: images that share a reference's feature F, compared on F's top-k components only,
  through their zero-shot reading of F (the cosines with F's value texts, z-scored over the image
  set, a softmax at temperature 0.1): images whose F components read as the same value, so that what
  the components also carry about other features does not count. That agreement saturates (every
  image of the reference's value reads it at ~1.000), so images whose agreement ties at the printed
  precision are ordered by the cosine of their whole representation with the reference's
  (``full_cosine`` in the ranking, shown beside the score).

:class:`Retrieve` is an :class:`~vitdecomp.apps.contract.AnalysisApplication`: ``vitdecomp retrieve
(--text T [--feature F] | --image PATH --feature F) [--k K] [--analysis DIR]`` writes its result as
``ranking.json`` (image ids best first with scores, the components used) and a ``gallery.html`` page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vitdecomp.apps.analysis import Analysis, analysis_result, auto_k, image_loader, refuse_untrained
from vitdecomp.apps.contract import AnalysisApplication
from vitdecomp.checks import check_at_least
from vitdecomp.defaults import ANALYSIS_DIR, N_RESULTS, RETRIEVE_OUT
from vitdecomp.errors import UsageError, VitDecompError
from vitdecomp.index import store_text_search
from vitdecomp.results import AppSection, ResultBase
from vitdecomp.store import reopen_store

TOP_N = N_RESULTS


@dataclass
class Gallery:
    """Aligned contributions of an image set: ``aligned [N, C, d_clip]``, ``bias [d_clip]``, names."""

    aligned: torch.Tensor
    bias: torch.Tensor
    labels: list[str]
    ids: list[str]

    def index(self, names: list[str]) -> list[int]:
        where = {lab: i for i, lab in enumerate(self.labels)}
        return [where[n] for n in names]

    def whole(self) -> torch.Tensor:
        """``[N, d_clip]``: the aligned whole representation."""
        return self.aligned.sum(1) + self.bias

    def part(self, names: list[str]) -> torch.Tensor:
        """``[N, d_clip]``: the aligned sum of the named components."""
        return self.aligned[:, self.index(names)].sum(1)


def top_components(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` components with the highest score."""
    return sorted(scores, key=lambda lab: -scores[lab])[:k]


def feature_basis(text_emb: torch.Tensor) -> torch.Tensor:
    """``[r, d]`` orthonormal rows spanning a feature's value embeddings ``[V, d]``."""
    q, r = torch.linalg.qr(text_emb.float().T)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep].T


def text_scores(gallery: Gallery, text_emb: torch.Tensor, components: list[str] | None) -> torch.Tensor:
    """``[N]`` cosine of each image's aligned components (all + bias when ``None``) with the text."""
    v = gallery.whole() if components is None else gallery.part(components)
    return F.normalize(v, dim=-1) @ F.normalize(text_emb.float(), dim=-1)


#: Temperature of the zero-shot reading image retrieval compares (on per-value z-scored cosines).
READING_TEMPERATURE = 0.1


def image_scores(
    gallery: Gallery,
    ref: int,
    components: list[str] | None,
    texts: torch.Tensor | None = None,
    how: str = "reading",
) -> torch.Tensor:
    """``[N]`` similarity to image ``ref`` on the chosen components (all when ``None``), centred over
    the image set. ``how``: ``"reading"`` (default, needs the feature's value ``texts [V, d]``): the
    components' zero-shot reading of the feature, ``softmax(z / T)`` of the cosines with the value
    texts z-scored over the set, compared by dot product — images whose components read as the same
    value; ``"span"``: cosine inside the span of the centred value texts; ``"cosine"``: plain cosine."""
    v = gallery.whole() if components is None else gallery.part(components)
    v = v - v.mean(0, keepdim=True)
    if how == "cosine":
        w = F.normalize(v, dim=-1)
        return w @ w[ref]
    if texts is None:
        raise VitDecompError(f"image retrieval '{how}' needs the feature's value texts")
    texts = texts.float()
    if how == "span":
        w = F.normalize(v @ feature_basis(texts - texts.mean(0, keepdim=True)).T, dim=-1)
        return w @ w[ref]
    z = F.normalize(v, dim=-1) @ F.normalize(texts, dim=-1).T  # [N, V]
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    p = torch.softmax(z / READING_TEMPERATURE, -1)
    return p @ p[ref]


#: Scores closer than this (the printed precision) tie; a tie-break then orders them.
TIE_RESOLUTION = 1e-3


def ranking(
    scores: torch.Tensor,
    ids: list[str],
    n: int = TOP_N,
    exclude: int | None = None,
    tie_break: torch.Tensor | None = None,
) -> list[dict]:
    """The ``n`` best images (``exclude``: the reference's row left out), best first: ``[{id, row,
    score}]``; with ``tie_break [N]``, scores equal at :data:`TIE_RESOLUTION` are ordered by it (kept
    in each row as ``full_cosine``)."""
    if tie_break is None:
        order = scores.argsort(descending=True, stable=True).tolist()
    else:
        order = tie_break.argsort(descending=True, stable=True)
        level = torch.round(scores.double() / TIE_RESOLUTION)[order]
        order = order[level.argsort(descending=True, stable=True)].tolist()
    order = [i for i in order if i != exclude][:n]
    rows = [{"id": ids[i], "row": i, "score": float(scores[i])} for i in order]
    if tie_break is not None:
        for r in rows:
            r["full_cosine"] = float(tie_break[r["row"]])
    return rows


@torch.no_grad()
def analysis_gallery(analysis: Analysis) -> Gallery:
    """The analysed image set's aligned contributions, read from its store."""
    store = reopen_store(analysis.result.store.path)
    contrib = store.batch(slice(None))["contributions"]
    return gallery_of(analysis, contrib, list(store.ids))


@torch.no_grad()
def store_text_scores(
    analysis: Analysis, text_emb: torch.Tensor, components: list[str] | None, batch_size: int = 1024
) -> torch.Tensor:
    """``[N, T]``: :func:`text_scores` of every image of the analysed store with each text of
    ``text_emb [T, d_clip]``, read in batches of rows (the whole aligned store never in memory)."""
    out = []
    for rows in reopen_store(analysis.result.store.path).iter_batches(batch_size):
        g = gallery_of(analysis, rows["contributions"], [])
        out.append(torch.stack([text_scores(g, t, components) for t in text_emb], 1))
    return torch.cat(out)


def gallery_of(analysis: Analysis, contributions: torch.Tensor, ids: list[str]) -> Gallery:
    """A gallery from contributions ``[N, C, D]`` in the analysis' component layout."""
    al = analysis.aligner
    if al is None:
        return Gallery(contributions.float(), torch.zeros(contributions.shape[-1]), analysis.result.labels, ids)
    return Gallery(al.apply(contributions), al.bias.float().cpu(), analysis.result.labels, ids)


def _append_reference(analysis: Analysis, gallery: Gallery, path: str) -> int:
    """Decompose an outside reference image and append it to the gallery; its row."""
    from vitdecomp import decompose
    from vitdecomp.imageset import read_image

    x = analysis.subject.preprocess(read_image(path))[None]
    d = decompose(analysis.subject, x, start_layer=analysis.result.start_layer or 0)
    extra = gallery_of(analysis, d.contributions, [path])
    gallery.aligned = torch.cat([gallery.aligned, extra.aligned])
    gallery.ids = [*gallery.ids, path]
    return len(gallery.ids) - 1


# ---------------------------------------------------------------------------- the application


@dataclass(kw_only=True)
class RetrieveConfig:
    """Options of ``vitdecomp retrieve``: a ``text`` or a reference ``image`` (a path, or an id of the
    analysed set; needs ``feature``), the ``feature`` whose top ``k`` components are read (default
    ``2 ceil(sqrt(C))``), how many images to return, the analysis folder (models on ``device``, the
    subject from ``checkpoint``), and the folder the command writes to."""

    text: str | None = None
    image: str | None = None
    feature: str | None = None
    k: int | None = None
    n_results: int = N_RESULTS
    analysis: str | Path = ANALYSIS_DIR
    checkpoint: str | Path | None = None
    device: str | None = "cpu"
    out: str | Path = RETRIEVE_OUT


@dataclass
class RetrievalResult(ResultBase):
    """What ``ranking.json`` holds: the query in words, the model, the components read and ``k``, and
    the ranking (``id``, ``row``, ``score``, and ``path`` for files of an analysed folder)."""

    name: ClassVar[str] = "retrieve"
    json_name: ClassVar[str] = "ranking"

    query: str
    model: str
    components: list[str] | None
    k: int
    ranking: list[dict[str, Any]]

    def section(self) -> AppSection:
        summary = f"{self.query}: the {len(self.ranking)} best images of the analysed set ({self.model})."
        if self.ranking and "full_cosine" in self.ranking[0]:
            rows = [[r["id"], f"{r['score']:.3f}", f"{r['full_cosine']:.3f}"] for r in self.ranking]
            summary += " Equal scores are ordered by the whole representation's cosine with the reference."
            return AppSection("retrieve", f"Retrieval: {self.query}", summary, ["image", "score", "full cosine"], rows)
        rows = [[r["id"], f"{r['score']:.3f}"] for r in self.ranking]
        return AppSection("retrieve", f"Retrieval: {self.query}", summary, ["image", "score"], rows)


class Retrieve(AnalysisApplication[RetrieveConfig, RetrievalResult]):
    """``vitdecomp retrieve``: rank the analysed image set by a text or by a reference image."""

    name = "retrieve"

    def check(self, cfg: RetrieveConfig) -> None:
        """Every argument against the analysis folder's ``results.json`` (and its store's ids, for a
        reference image given by id), before any model loads."""
        if (cfg.text is None) == (cfg.image is None):
            raise VitDecompError("give a text (--text) or a reference image (--image), one of the two")
        if cfg.image is not None and cfg.feature is None:
            raise VitDecompError("--image needs --feature: the feature the images should share")
        check_at_least("--n-results", cfg.n_results, 1)
        check_at_least("--k", cfg.k, 1)
        result = analysis_result(cfg.analysis)
        refuse_untrained(result, cfg.analysis)
        if cfg.feature is not None and cfg.feature not in result.features:
            raise UsageError(
                f"--feature {cfg.feature}: not a feature of this analysis; its features: {sorted(result.features)}"
            )
        if cfg.k is not None and cfg.k > len(result.labels):
            raise UsageError(f"--k {cfg.k}: the analysis has {len(result.labels)} components")
        if (
            cfg.image is not None
            and not Path(cfg.image).is_file()
            and cfg.image not in reopen_store(result.store.path).ids
        ):
            raise UsageError(f"--image {cfg.image}: no such file, nor an image id of the analysed set")

    def measure(self, cfg: RetrieveConfig, analysis: Analysis) -> RetrievalResult:
        gallery = analysis_gallery(analysis)
        k = cfg.k or auto_k(len(gallery.labels))
        comps = None if cfg.feature is None else top_components(analysis.scores(cfg.feature), k)
        if cfg.text is not None:
            query = analysis.embed([cfg.text])[0]  # FAISS index of the store, persisted beside it
            path, n = analysis.result.store.path, cfg.n_results
            scores, exclude, tie_break = store_text_search(path, analysis.aligner, comps, query, n), None, None
            title = f'"{cfg.text}"' + (f" through {cfg.feature} (top {k})" if comps else " (whole representation)")
        else:
            assert cfg.image is not None and cfg.feature is not None
            in_set = cfg.image in gallery.ids
            exclude = gallery.ids.index(cfg.image) if in_set else _append_reference(analysis, gallery, cfg.image)
            texts = analysis.embed(list(analysis.result.features[cfg.feature]))
            scores = image_scores(gallery, exclude, comps, texts)
            tie_break = image_scores(gallery, exclude, None, how="cosine")
            title = f"same {cfg.feature} as {cfg.image} (top {k} components, read as {cfg.feature}'s values)"
        rows = ranking(scores, gallery.ids, cfg.n_results, exclude, tie_break)
        root = analysis.result.images.root
        for r in rows:
            if root and not r["id"].startswith("world-"):
                r["path"] = str(Path(root) / r["id"])
        return RetrievalResult(title, analysis.result.model.name, comps, k, rows)


def ranked_images(result: RetrievalResult, root: str = "") -> Callable[[int], Any]:
    """``position in the ranking -> PIL image`` of a result's images (files under the analysed folder
    ``root``, or generated world scenes)."""
    load = image_loader([r["id"] for r in result.ranking], root)
    return lambda i: load(result.ranking[i]["id"])
