"""The stages in order, from an :class:`~vitdecomp.pipeline.config.AnalysisConfig` to an
:class:`~vitdecomp.results.AnalysisResult`: :func:`prepare` (image set, models, filled store) then
:func:`read_components` (align, embed the text, describe, score, find the top images). No report is
written here: :func:`vitdecomp.analyze.run_analysis` adds the report's figures, the applications and
the files.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from vitdecomp.errors import UsageError
from vitdecomp.imageset import ImageSource, image_source, skip_report
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.fill import BuiltStore, StoreFiller, completeness_errors, configured_store, readable_rows
from vitdecomp.pipeline.honesty import rank_one_components
from vitdecomp.pipeline.model_pair import Models, configured_models
from vitdecomp.pipeline.stages import (
    AlignerStage,
    Readings,
    TextSpace,
    collect_result,
    confidence,
    configured_aligner,
    mean_aligned_norms,
    text_space,
    top_directions,
    top_images,
)
from vitdecomp.results import AnalysisResult
from vitdecomp.scores import analysis_scores, score_features
from vitdecomp.store import Rows
from vitdecomp.text import component_descriptions


class Clock:
    """Wall time of each stage (``timings``, seconds) and of the whole run."""

    def __init__(self) -> None:
        self.start = time.time()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.time()
        yield
        self.timings[stage] = time.time() - t0


def prepare(
    cfg: AnalysisConfig, clock: Clock, device: str, source: ImageSource | None = None
) -> tuple[Models, ImageSource, BuiltStore]:
    """The image set (``source`` or the one ``cfg`` names), the models, and the filled store."""
    with clock("images"):
        source = source or image_source(cfg.images, cfg.n_images, cfg.seed, cfg.skip_bad_images, progress=cfg.progress)
        if len(source) < 2:
            skipped = f" ({len(source.errors)} unreadable file(s) skipped)" if source.errors else ""
            raise UsageError(f"need at least 2 images, got {len(source)}{skipped}: give a folder with more (--images)")
        report = skip_report(source)
        if report:
            print(f"vitdecomp: {report}", file=sys.stderr)
    with clock("load_models"):
        models = configured_models(cfg, device)
    with clock("decompose_store"):
        built = configured_store(cfg, models, source, device, fill=store_filler(cfg))
    return models, source, built


def store_filler(cfg: AnalysisConfig) -> StoreFiller | None:
    """Who fills the store: ``None`` (this process) or a Ray actor pool (``--runner ray``)."""
    if cfg.runner != "ray":
        return None
    from vitdecomp.pipeline.ray_fill import RayRunner

    return RayRunner(cfg.address, cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)


def read_components(
    cfg: AnalysisConfig, clock: Clock, device: str, models: Models, source: ImageSource, built: BuiltStore
) -> tuple[AnalysisResult, np.ndarray]:
    """Align the stored components, embed the text, describe, score and find each component's top
    images; returns the result and the rows of the top images ``[C, n]``."""
    rows = readable_rows(built.store)  # small stores are read into memory once
    errors = completeness_errors(rows)
    rank1 = rank_one_components(rows)
    with clock("align"):
        aligned = configured_aligner(cfg, rows, models, device)
    with clock("text"):
        space = text_space(
            models.reader,
            cfg.cache_path / "text",
            world=source.is_world,
            features=cfg.features,
            vocabulary=cfg.vocabulary,
            templates=cfg.templates,
            device=device,
        )
    readings = _readings(cfg, clock, rows, aligned, space, errors, rank1)
    result = collect_result(models, source, built, aligned, space, readings, cfg.cache_path, clock.timings)
    return result, readings.top[0]


def _readings(
    cfg: AnalysisConfig,
    clock: Clock,
    rows: Rows,
    aligned: AlignerStage,
    space: TextSpace,
    errors: np.ndarray,
    rank1: dict[str, float],
) -> Readings:
    """Descriptions (none for the rank-1 components), scores, their confidence and the top images."""
    al = aligned.aligner
    with clock("describe"):
        descr = component_descriptions(
            rows, al, space.vocabulary_emb, space.vocabulary, cfg.top_k, progress=cfg.progress
        )
        descr = {lab: ([] if lab in rank1 else ds) for lab, ds in descr.items()}
    with clock("score"):
        tables = score_features(rows, al, space.feature_emb, methods=analysis_scores(), progress=cfg.progress)
    with clock("confidence"):
        conf, presence = confidence(rows, al, space, progress=cfg.progress)
    with clock("top_images"):
        top = top_images(rows, al, top_directions(descr, space.vocabulary_emb), n=cfg.n_top_images)
        norms = mean_aligned_norms(rows, al)
    return Readings(descr, tables, conf, norms, top, errors, rank1, presence)
