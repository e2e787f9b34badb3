"""The stages in order, from an :class:`~vitdecomp.pipeline.config.AnalysisConfig` to an
:class:`~vitdecomp.results.AnalysisResult`: :func:`prepare` (image set, models, filled store) then
:func:`read_components` (align, embed the text, describe, score, find the top images). No report is
written here: :func:`vitdecomp.analyze.run_analysis` adds the report's figures, the applications and
the files.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from vitdecomp.errors import UsageError
from vitdecomp.imageset import ImageSource, image_source, skip_report
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.fill import BuiltStore, StoreFiller, completeness_errors, configured_store, readable_rows
from vitdecomp.pipeline.honesty import rank_one_components
from vitdecomp.pipeline.model_pair import Models, configured_models
from vitdecomp.pipeline.stages import (
    N_BOOT,
    N_NULL,
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
from vitdecomp.scores import DEFAULT_SCORE, analysis_scores, score_features
from vitdecomp.store import Rows
from vitdecomp.text import component_descriptions


class Clock:
    """Wall time of each stage (``timings``, seconds) and of the whole run; ``say`` (e.g. a line on
    stdout) is told what each stage starts, so no stage runs silent."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.start = time.time()
        self.timings: dict[str, float] = {}
        self.say = say

    @contextmanager
    def __call__(self, stage: str, what: str = "") -> Iterator[None]:
        if self.say is not None and what:
            self.say(what)
        t0 = time.time()
        yield
        self.timings[stage] = time.time() - t0

    def line(self) -> str:
        """The stage timings on one line: ``"load_models 3.1 s · decompose_store 22.0 s · ..."``."""
        return " · ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())


def say(text: str) -> None:
    """One status line on stdout (``vitdecomp: ...``), flushed at once; stderr stays for the one-line
    errors and the warnings."""
    print(f"vitdecomp: {text}", flush=True)


def prepare(
    cfg: AnalysisConfig, clock: Clock, device: str, source: ImageSource | None = None
) -> tuple[Models, ImageSource, BuiltStore]:
    """The image set (``source`` or the one ``cfg`` names), the models, and the filled store."""
    with clock("images", "reading the images" if cfg.images else f"generating the world's scenes (seed {cfg.seed})"):
        source = source or image_source(cfg.images, cfg.n_images, cfg.seed, cfg.skip_bad_images, progress=cfg.progress)
        if len(source) < 2:
            skipped = f" ({len(source.errors)} unreadable file(s) skipped)" if source.errors else ""
            raise UsageError(f"need at least 2 images, got {len(source)}{skipped}: give a folder with more (--images)")
        report = skip_report(source)
        if report:
            print(f"vitdecomp: {report}", file=sys.stderr)
    reader = f" and the reader {cfg.reader}" if cfg.reader else ""
    with clock("load_models", f"loading the subject {cfg.model}{reader} (imports torch, timm / open_clip)"):
        models = configured_models(cfg, device)
    with clock("decompose_store", f"decomposing {len(source)} images into the store ({cfg.cache_path / 'stores'})"):
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
    with clock("checks", "checking completeness and finding the constant (rank-1) components"):
        rows = readable_rows(built.store)  # small stores are read into memory once
        errors = completeness_errors(rows)
        rank1 = rank_one_components(rows, progress=cfg.progress)
    with clock("align", "aligning the components to the reader's space (CompAlign, cached per setting)"):
        aligned = configured_aligner(cfg, rows, models, device)
    with clock("text", "embedding the features and the vocabulary with the reader's text tower (cached)"):
        space = text_space(
            models.reader,
            cfg.cache_path / "text",
            world=source.is_world,
            features=cfg.features,
            vocabulary=cfg.vocabulary,
            templates=cfg.templates,
            device=device,
            progress=cfg.progress,
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
    with clock("describe", "describing each component with the vocabulary (TextSpan)"):
        descr = component_descriptions(
            rows, al, space.vocabulary_emb, space.vocabulary, cfg.top_k, progress=cfg.progress
        )
        descr = {lab: ([] if lab in rank1 else ds) for lab, ds in descr.items()}
    with clock("score", f"scoring every component for every feature ({', '.join(analysis_scores())})"):
        tables = score_features(rows, al, space.feature_emb, methods=analysis_scores(), progress=cfg.progress)
    which = {"ranked": f"the {DEFAULT_SCORE} score", "all": "every score", "none": ""}[cfg.confidence]
    what = f"confidence of {which}: {N_BOOT} bootstrap resamples, {N_NULL} null features" if which else ""
    with clock("confidence", what or "the features' presence test"):
        conf, presence = confidence(rows, al, space, progress=cfg.progress, which=cfg.confidence)
    with clock("top_images", "finding each component's top images"):
        top = top_images(rows, al, top_directions(descr, space.vocabulary_emb), n=cfg.n_top_images)
        norms = mean_aligned_norms(rows, al)
    return Readings(descr, tables, conf, norms, top, errors, rank1, presence)
