"""One call runs the whole method on one image set: :func:`run_analysis`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vitdecomp.apps.report_views import report_views
from vitdecomp.errors import UsageError
from vitdecomp.fsio import writing
from vitdecomp.imageset import ImageSource, image_source, skip_report
from vitdecomp.pipeline.applications import run_applications
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.configured import configured_aligner, configured_models, configured_store
from vitdecomp.pipeline.honesty import rank_one_components, run_warnings
from vitdecomp.pipeline.runners import RayRunner
from vitdecomp.pipeline.stages import (
    BuiltStore,
    Models,
    StoreFiller,
    collect_result,
    completeness_errors,
    confidence,
    mean_aligned_norms,
    readable_rows,
    text_space,
    top_directions,
    top_images,
)
from vitdecomp.report import AnalysisResult, summary, write_report
from vitdecomp.results import OutputPaths
from vitdecomp.scores import analysis_scores, score_features
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


def run_analysis(
    cfg: AnalysisConfig | None = None, *, source: ImageSource | None = None, checked: bool = False
) -> AnalysisResult:
    """Run every stage (see :mod:`vitdecomp.pipeline.stages`) on one image set and write
    ``cfg.out/results.json`` and ``cfg.out/index.html``.

    ``source`` replaces the image set that ``cfg`` names (``images`` / ``n_images`` / ``seed``).
    The options are checked first (:meth:`AnalysisConfig.check`; ``checked``: already done).
    Returns the result that ``results.json`` holds; its ``cache`` part says what was reused from
    the cache and what was computed, its ``warnings`` why its figures may mean little (also
    printed: in the summary, or on stderr when ``verbose`` is off).
    """
    cfg = cfg or AnalysisConfig()
    if not checked:
        cfg.check()
    clock = Clock()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, source, built = prepare(cfg, clock, device, source)
    result, top_idx = read_components(cfg, clock, device, models, source, built)
    result.warnings = run_warnings(result, models, random_init=cfg.random_init, seed=cfg.seed)
    with clock("report_views"):
        result.views = report_views(result, source, models.subject, models.reader, progress=cfg.progress)
    if cfg.apps:
        with clock("applications"):
            result.applications, failed = run_applications(cfg, models, device)
            result.warnings += failed
    write_outputs(result, source, top_idx, Path(cfg.out), clock, progress=cfg.progress)
    if cfg.verbose:
        print(summary(result))
    else:
        for w in result.warnings:
            print(f"vitdecomp: warning: {w}", file=sys.stderr)
    return result


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
    """Who fills the store: ``None`` (this process) or a :class:`RayRunner` (``--runner ray``)."""
    if cfg.runner != "ray":
        return None
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
    al = aligned.aligner
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
    with clock("describe"):
        descr = component_descriptions(
            rows, al, space.vocabulary_emb, space.vocabulary, cfg.top_k, progress=cfg.progress
        )
        descr = {lab: ([] if lab in rank1 else ds) for lab, ds in descr.items()}
    with clock("score"):
        tables = score_features(rows, al, space.feature_emb, methods=analysis_scores(), progress=cfg.progress)
    with clock("confidence"):
        conf = confidence(rows, al, space.feature_emb, progress=cfg.progress)
    with clock("top_images"):
        top = top_images(rows, al, top_directions(descr, space.vocabulary_emb), n=cfg.n_top_images)
        norms = mean_aligned_norms(rows, al)
    result = collect_result(
        models=models,
        source=source,
        built=built,
        aligned=aligned,
        space=space,
        descriptions=descr,
        tables=tables,
        norms=norms,
        top=top,
        errors=errors,
        cache_dir=cfg.cache_path,
        timings=clock.timings,
        constant=rank1,
    )
    result.confidence = conf
    return result, top[0]


def write_outputs(
    result: AnalysisResult, source: ImageSource, top_idx: np.ndarray, out: Path, clock: Clock, progress: bool = True
) -> None:
    """Write ``out/index.html`` (thumbnails of rows ``top_idx [C, n]``) and then ``out/results.json``
    (with the report's time and the total in ``timings_s``, and ``paths``), each atomically: a kill
    or a full disk leaves the previous report in place."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with clock("report"):
        html = write_report(result, source, out, top_idx, progress=progress)
    clock.timings["total"] = time.time() - clock.start
    result.timings_s = {k: round(v, 3) for k, v in clock.timings.items()}
    result.paths = OutputPaths(str(out), str(out / "results.json"), str(html))
    result.write(out / "results.json")
