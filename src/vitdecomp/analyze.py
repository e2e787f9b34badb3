"""``vitdecomp analyze``: decompose, store, align, describe and score every component; write a report.

One call of :func:`run_analysis` runs the whole method on one image set::

    images ─▶ decompose (subject model) ─┐
           ─▶ reader's image embedding ──┴▶ store (keyed, resumable, on disk)
    store ─▶ CompAlign (trained once and cached; identity when the subject is the reader)
          ─▶ TextSpan descriptions per component (vocabulary embedded by the reader's text tower, cached)
          ─▶ scores of every component for every feature (every score of vitdecomp.scores' registry
             that an analysis computes; ranked by the default, text_probe)
          ─▶ the report's figures (heatmaps, head grids, retrieval galleries) and the applications
             whose inputs are in the image folder
          ─▶ report folder: results.json + index.html (self-contained)

The *reader* is the CLIP model whose text space names the components (``--clip``). With no options
it runs offline on the built-in default: the zoo's DeiT-like model read through the zoo's CLIP, on
:data:`~vitdecomp.defaults.DEFAULT_N_IMAGES` generated scenes of the built-in world drawn from
:data:`~vitdecomp.defaults.WORLD_SEED` — a seed none of the zoo's training, validation or probe sets
used (they use 1000, 1001, 1500 and 2001, 2002). With ``images=DIR`` it reads an image folder and
scores the paper's features with the general vocabulary::

    from vitdecomp.analyze import AnalysisConfig, run_analysis
    result = run_analysis(AnalysisConfig(model="zoo:simclr", n_images=500, out="out"))
    result.scores["invariant"]["color"]        # {component label: score}

The top floor of the library: it joins the pipeline's stages (:mod:`vitdecomp.pipeline`), the report's
figures and the automatic applications (:mod:`vitdecomp.apps`) and the report (:mod:`vitdecomp.report`).
Caches live under ``cache_dir`` (default ``$VITDECOMP_CACHE`` or ``~/.cache/vitdecomp``).
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import numpy as np

from vitdecomp.apps.automatic import run_applications
from vitdecomp.apps.report_figures import report_views
from vitdecomp.checks import default_device
from vitdecomp.fsio import atomic_write_text, folder_lock, remove_stale_temps, writing
from vitdecomp.imageset import ImageSource
from vitdecomp.pipeline.config import AnalysisConfig, default_cache_dir
from vitdecomp.pipeline.honesty import run_warnings
from vitdecomp.pipeline.sequence import Clock, prepare, read_components, say
from vitdecomp.report import report_page, summary
from vitdecomp.report.attach import REPORT_FILES
from vitdecomp.report.outputs import write_app_outputs
from vitdecomp.results import AnalysisResult, OutputPaths

__all__ = ["AnalysisConfig", "AnalysisResult", "default_cache_dir", "run_analysis"]


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
    clock = Clock(say if cfg.progress else None)
    device = default_device(cfg.device)
    models, source, built = prepare(cfg, clock, device, source)
    result, top_idx = read_components(cfg, clock, device, models, source, built)
    result.warnings = run_warnings(result, models, random_init=cfg.random_init, seed=cfg.seed)
    if result.alignment.state == "untrained":  # not saved: the figures that read it again have none
        result.warnings.append("no heatmaps, head views or galleries: they need a trained aligner (--align-steps > 0)")
    else:
        with clock("report_views", "the report's figures: head grids, top heads' maps, head views, galleries"):
            result.views = report_views(result, source, models.subject, models.reader, progress=cfg.progress)
    if cfg.apps:
        with clock("applications"):  # each application found says so (apps/automatic.py)
            runs, failed = run_applications(cfg, models, device)
            for run in runs:
                if run.out is not None:
                    write_app_outputs(run.result, run.out)
            result.applications = [run.result.section() for run in runs]
            result.warnings += failed
    write_outputs(result, source, top_idx, Path(cfg.out), clock, progress=cfg.progress)
    if cfg.verbose:
        print(summary(result))
    else:
        for w in result.warnings:
            print(f"vitdecomp: warning: {w}", file=sys.stderr)
    return result


def write_outputs(
    result: AnalysisResult, source: ImageSource, top_idx: np.ndarray, out: Path, clock: Clock, progress: bool = True
) -> None:
    """Write ``out/results.json`` and then ``out/index.html`` (thumbnails of rows ``top_idx [C, n]``),
    each atomically, under a lock on ``out`` (:func:`~vitdecomp.fsio.folder_lock`): the page carries
    the ``run_id`` that ``results.json`` states, so a kill between the two leaves a complete
    ``results.json`` and the previous page, told apart by their ids (``--report`` then renders the page
    again); what a killed run left (temporary files) is removed first."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    result.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with folder_lock(out):
        remove_stale_temps(out, REPORT_FILES)
        with clock("report", f"writing the report ({out})"):
            page = report_page(result, source, top_idx, progress=progress)
        clock.timings["total"] = time.time() - clock.start
        result.timings_s = {k: round(v, 3) for k, v in clock.timings.items()}
        result.paths = OutputPaths(str(out), str(out / "results.json"), str(out / "index.html"))
        result.write(out / "results.json")
        atomic_write_text(out / "index.html", page)
