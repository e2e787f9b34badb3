"""The stages of one analysis after the store, each a function of plain data that a notebook can
call on its own::

    image source ─▶ models (subject + reader, :mod:`~vitdecomp.pipeline.model_pair`) ─▶ store
    (:mod:`~vitdecomp.pipeline.fill`) ─▶ aligner (identity, given, cached or trained CompAlign) ─▶ text
    space (features and vocabulary embedded by the reader's text tower, cached) ─▶ descriptions
    (TextSpan) ─▶ scores ─▶ top images ─▶ :class:`~vitdecomp.results.AnalysisResult`

The stages read rows through the :class:`~vitdecomp.store.Rows` protocol. Caches live under one
root: ``stores/`` (one folder per store key), ``aligners/`` (one folder per model setting, image set
and training options, see :mod:`vitdecomp.aligner_cache`) and ``text/`` (text embeddings per reader
weights + templates). :mod:`~vitdecomp.pipeline.sequence` runs them in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdecomp.align import Aligner, evaluate, identity_aligner
from vitdecomp.aligner_cache import AlignOptions, get_aligner
from vitdecomp.errors import MismatchError
from vitdecomp.imageset import ImageSource
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.fill import BuiltStore
from vitdecomp.pipeline.model_pair import Models
from vitdecomp.results import analysis as schema
from vitdecomp.scores import (
    DEFAULT_SCORE,
    Resampling,
    ScoreTable,
    analysis_scores,
    embed_features,
    feature_presence,
    load_features,
    score_confidence,
)
from vitdecomp.store import Rows
from vitdecomp.text import DEFAULT_TEMPLATES, WORLD_TEMPLATES, Description, TextEncoder, load_vocabulary

#: Bootstrap resamples and null draws behind every score's interval and p-value (``results.json``
#: ``confidence``); 19 null draws make "above every null draw" a test at p = 0.05.
N_BOOT = 100
N_NULL = 19
#: The vocabulary the scores' null features are drawn from (random groups of its real texts).
NULL_VOCABULARY = "general"


@dataclass
class AlignerStage:
    """The aligner, where it came from (``state``: identity, given, loaded, trained, untrained), its
    folder (``None`` when not cached) and the cosine of the aligned whole to the reader's embedding
    over every image."""

    aligner: Aligner
    state: str
    path: Path | None
    cosine_all_images: float | None = None


def align_components(
    rows: Rows,
    root: str | Path,
    options: AlignOptions | None = None,
    *,
    identity: bool,
    device: str = "cpu",
    **cache: Any,
) -> AlignerStage:
    """The identity map when the subject is the reader (``identity``), else the cached or trained
    CompAlign aligner (:func:`vitdecomp.aligner_cache.get_aligner` with ``options``; ``cache``: its
    ``given`` / ``progress`` / ``log``); measured by its cosine to the reader's embedding over every
    image."""
    if identity:
        d_model, d_clip = rows.shapes["contributions"][1], rows.shapes["clip"][0]
        if d_model != d_clip:
            raise MismatchError(f"CLIP subject's contributions have {d_model} dims, its embedding {d_clip}")
        stage = AlignerStage(identity_aligner(rows.labels, d_clip, key=rows.key), "identity", None)
    else:
        got = get_aligner(rows, root, options, device=device, **cache)
        stage = AlignerStage(got.aligner, got.state, got.path)
    stage.aligner = stage.aligner.to(device)
    stage.cosine_all_images = evaluate(stage.aligner, rows)["cosine"]
    return stage


def configured_aligner(cfg: AnalysisConfig, rows: Rows, models: Models, device: str) -> AlignerStage:
    """The aligner of ``rows`` under ``cfg``'s cache and CompAlign options (identity for CLIP subjects)."""
    return align_components(
        rows,
        cfg.cache_path / "aligners",
        AlignOptions(cfg.lam, cfg.align_steps, cfg.align_batch_size, cfg.val_fraction),
        identity=models.identity,
        device=device,
        given=cfg.aligner,
        progress=cfg.progress,
        log=print if cfg.verbose else (lambda *a, **k: None),
    )


@dataclass
class TextSpace:
    """The features and the vocabulary, embedded by the reader's text tower, and the real texts the
    scores' null draws its features from (``null_pool``: the general vocabulary, same templates)."""

    features: dict[str, list[str]]
    feature_emb: dict[str, torch.Tensor]
    vocabulary_name: str
    vocabulary: list[str]
    vocabulary_emb: torch.Tensor
    templates: tuple[str, ...]
    encoder_batches: int
    null_pool: torch.Tensor | None = None


def text_space(
    reader: LoadedModel,
    cache_dir: str | Path | None,
    *,
    world: bool,
    features: str | Path | Mapping[str, Sequence[str]] | None = None,
    vocabulary: str | Path | None = None,
    templates: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> TextSpace:
    """Embed the features and the vocabulary (defaults: the world's for world scenes, else the
    paper's features and the general vocabulary) under the prompt ``templates`` (``progress``: a bar
    while texts not in the cache are embedded)."""
    feats = load_features(features if features is not None else ("world" if world else "paper"))
    vocab_name = vocabulary if vocabulary is not None else ("world" if world else "general")
    vocab = load_vocabulary(vocab_name)
    templates = tuple(templates) if templates else (WORLD_TEMPLATES if world else DEFAULT_TEMPLATES)
    encoder = TextEncoder.from_loaded(reader, cache_dir=cache_dir, device=device)
    encoder.progress = progress
    vocab_emb = encoder.encode(vocab, templates)
    feat_emb = embed_features(lambda t: encoder.encode(t, templates), feats)
    pool = vocab_emb if vocab_name == NULL_VOCABULARY else encoder.encode(load_vocabulary(NULL_VOCABULARY), templates)
    return TextSpace(feats, feat_emb, str(vocab_name), vocab, vocab_emb, templates, encoder.calls, pool)


def top_directions(descriptions: Mapping[str, list[Description]], vocabulary_emb: torch.Tensor) -> torch.Tensor:
    """Per component, the embedding of its top description (zeros without one): ``[C, d_clip]``."""
    zero = torch.zeros(vocabulary_emb.shape[1])
    return torch.stack([vocabulary_emb[d[0].index] if d else zero for d in descriptions.values()])


@torch.no_grad()
def top_images(
    rows: Rows, aligner: Aligner, directions: torch.Tensor, n: int = 4, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per component, the ``n`` images whose aligned contribution projects most on that component's
    direction ``directions [C, d_clip]`` (its top description): ``(indices [C, n], values [C, n])``."""
    dirs = torch.nn.functional.normalize(directions.float(), dim=-1).to(aligner.device)
    best_v = torch.empty(0, dirs.shape[0])
    best_i = torch.empty(0, dirs.shape[0], dtype=torch.long)
    start = 0
    for b in rows.iter_batches(batch_size):  # a running top n: memory does not grow with the images
        p = (aligner.apply(b["contributions"]) * dirs[None]).sum(-1).cpu()  # [b, C]
        rows_i = torch.arange(start, start + len(p))[:, None].expand_as(p)
        v, i = torch.cat([best_v, p]), torch.cat([best_i, rows_i])
        best_v, keep = v.topk(min(n, len(v)), dim=0)
        best_i = i.gather(0, keep)
        start += len(p)
    return best_i.T.numpy(), best_v.T.numpy()


@torch.no_grad()
def mean_aligned_norms(rows: Rows, aligner: Aligner, batch_size: int = 256) -> np.ndarray:
    """Mean norm of each component's aligned contribution over the images ``[C]``."""
    total = torch.zeros(aligner.n_components)
    for b in rows.iter_batches(batch_size):
        total = total + aligner.apply(b["contributions"]).norm(dim=-1).sum(0).cpu()
    return (total / max(len(rows), 1)).numpy()


def confidence(
    rows: Rows, aligner: Aligner, space: TextSpace, progress: bool = True, which: str = "ranked"
) -> tuple[dict, dict]:
    """Bootstrap intervals and a null (groups of real texts of ``space.null_pool``) for the scores
    ``which`` names (``"ranked"``: :data:`~vitdecomp.scores.DEFAULT_SCORE`, the one the report shows
    them for; ``"all"``: every score :func:`~vitdecomp.scores.analysis_scores` lists; ``"none"``; see
    :func:`vitdecomp.scores.score_confidence`), JSON-ready per method, and the features' presence test
    (JSON-ready; ``{}`` without a pool; run with ``"none"`` too)."""
    methods = {"ranked": [DEFAULT_SCORE], "all": list(analysis_scores()), "none": []}[which]
    draws, pool = Resampling(N_BOOT, N_NULL), space.null_pool
    if not methods:
        if pool is None:
            return {}, {}
        return {}, feature_presence(rows, space.feature_emb, pool, aligner).to_dict()
    conf = score_confidence(rows, aligner, space.feature_emb, methods, draws, null_pool=pool, progress=progress)
    presence = next(iter(conf.values())).presence if conf else None
    return {m: c.to_dict() for m, c in conf.items()}, ({} if presence is None else presence.to_dict())


@dataclass
class Readings:
    """What the stages after the aligner read off the components: ``descriptions`` (TextSpan picks per
    label), score ``tables`` per method, ``confidence`` (JSON-ready per method), ``norms [C]`` (mean
    aligned norm), ``top = (rows [C, n], projections [C, n])`` of the top images, completeness
    ``errors [N]`` and the ``constant`` (rank-1) components, which get no top images; ``presence``: the
    features' presence test (JSON-ready)."""

    descriptions: Mapping[str, list[Description]]
    tables: Mapping[str, ScoreTable]
    confidence: dict[str, Any]
    norms: np.ndarray
    top: tuple[np.ndarray, np.ndarray]
    errors: np.ndarray
    constant: dict[str, float]
    presence: dict[str, Any] = field(default_factory=dict)


def collect_result(
    models: Models,
    source: ImageSource,
    built: BuiltStore,
    aligned: AlignerStage,
    space: TextSpace,
    readings: Readings,
    cache_dir: Path,
    timings: dict[str, float],
) -> schema.AnalysisResult:
    """Every stage's output as one :class:`~vitdecomp.results.AnalysisResult` (the content of
    ``results.json``), ranked by :data:`vitdecomp.scores.DEFAULT_SCORE`."""
    r, subject, reader, al = readings, models.subject, models.reader, aligned.aligner
    labels, (idx, vals), tables = built.store.labels, r.top, r.tables
    metrics = {k: v for k, v in al.metrics.items() if k != "history"}
    return schema.AnalysisResult(
        model=schema.ModelInfo(subject.name, subject.weights_id, subject.is_clip),
        reader=schema.ReaderInfo(reader.name, reader.weights_id),
        images=schema.ImagesInfo(source.description, source.key, len(source), list(source.errors), source.root),
        start_layer=built.key.start_layer,
        labels=labels,
        features=space.features,
        vocabulary=schema.VocabularyInfo(space.vocabulary_name, len(space.vocabulary), list(space.templates)),
        scores={m: t.to_dict() for m, t in tables.items()},
        rankings={m: {f: [lab for lab, _ in t.ranking(f)] for f in t.features} for m, t in tables.items()},
        descriptions={
            lab: [schema.Pick(d.text, d.explained, d.projection) for d in ds] for lab, ds in r.descriptions.items()
        },
        mean_aligned_norm={lab: float(v) for lab, v in zip(labels, r.norms, strict=True)},
        top_images={
            lab: []
            if lab in r.constant
            else [schema.TopImage(source.ids[j], float(v)) for j, v in zip(idx[c], vals[c], strict=True)]
            for c, lab in enumerate(labels)
        },
        completeness=schema.Completeness(float(r.errors.max()), float(r.errors.mean()), float(np.median(r.errors))),
        alignment=schema.Alignment(al.mode, al.lam, aligned.state, aligned.cosine_all_images, metrics),
        store=schema.StoreInfo(str(built.store.path), built.key.to_dict(), built.key.digest()),
        aligner=schema.AlignerInfo(None if aligned.path is None else str(aligned.path), al.key),
        cache=schema.CacheInfo(
            str(cache_dir), built.rows_computed, built.rows_reused, aligned.state, space.encoder_batches
        ),
        timings_s=timings,
        constant=dict(r.constant),
        confidence=r.confidence,
        presence=r.presence,
        ranked_by=DEFAULT_SCORE,
    )
