"""The ``applications`` stage of ``vitdecomp analyze``: the applications whose inputs are in the image
folder, each run and turned into a section of the report (:class:`~vitdecomp.results.AppSection`).

What is looked for (:func:`detect_applications`), and nothing else, so that no guess is made:

``segment``  a masks folder, ``IMAGES/masks`` or, when the folder is named ``images/`` (as a world
             export's), the ``masks/`` beside it: :func:`vitdecomp.apps.segment.segment` on the masked images with
             the decomposition's map (:data:`AUTO_SEGMENT_METHODS`; the first :data:`AUTO_SEGMENT_IMAGES` at
             most), reusing the subject model ``analyze`` loaded.
``debias``   ``IMAGES/metadata.csv`` with the Waterbirds columns (``img_filename, y, split, place``):
             :class:`vitdecomp.apps.debias.Debias` with ``analyze``'s models, cache and CompAlign
             steps; it reads the store and aligner ``analyze`` just cached when ``analyze`` ran on the
             whole folder with the default start layer and store type, else builds its own. Not with
             ``--random-init`` (debias reads pretrained weights). Its files go to ``OUT/debias/``.

An application that fails (its input, or a bug) is a warning of the run, not the end of it; with
``--skip-bad-images`` it skips what ``analyze`` skips. ``--no-apps``
skips the stage. ``vitdecomp ablate`` needs no more than the images but costs as much as another
analysis, so it is not run here: add it with ``vitdecomp ablate ... --report OUT``.
"""

from __future__ import annotations

import csv
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitdecomp.errors import VitDecompError, one_line
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.model_pair import Models, load_model_for
from vitdecomp.results import AppResult

WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")
#: Most images the automatic segment step maps, and with which methods: the decomposition's own map
#: only — GradCAM and Chefer et al.'s rollout each cost 3-5 forward passes an image (a backward with
#: weight gradients), on a base-size model more than the analysis of 64 images; the section's command
#: (``vitdecomp segment ... --methods decomposition,gradcam,chefer``) compares them on as many images
#: as wanted. One image per batch, so that its progress bar moves after every image.
AUTO_SEGMENT_IMAGES = 4
AUTO_SEGMENT_BATCH = 1
AUTO_SEGMENT_METHODS = ("decomposition",)


@dataclass(frozen=True)
class Found:
    """The application inputs in an image folder: ``masks`` folder and Waterbirds ``metadata`` file."""

    masks: Path | None = None
    metadata: Path | None = None


def detect_applications(images: str | Path | None) -> Found:
    """What :mod:`this stage <vitdecomp.apps.automatic>` runs on ``images`` (``None``: the
    generated world scenes, which carry no application inputs)."""
    if images is None:
        return Found()
    folder = Path(images)
    beside = [folder.parent / "masks"] if folder.name == "images" else []
    masks = next((p for p in [folder / "masks", *beside] if p.is_dir()), None)
    metadata = folder / "metadata.csv"
    return Found(masks, metadata if metadata.is_file() and _waterbirds_header(metadata) else None)


def _waterbirds_header(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return set(WATERBIRDS_COLUMNS) <= {h.strip() for h in header}


@dataclass
class AutomaticRun:
    """An application ``analyze`` ran: its result and the folder its files go to (``None``: none)."""

    result: AppResult
    out: Path | None = None


def run_applications(cfg: AnalysisConfig, models: Models, device: str) -> tuple[list[AutomaticRun], list[str]]:
    """The applications found in ``cfg.images``, run, and a warning per one that failed."""
    found = detect_applications(cfg.images)
    runs: list[AutomaticRun] = []
    warnings: list[str] = []
    if found.masks is not None:
        _attempt("segment", lambda: AutomaticRun(run_segment(cfg, models, found.masks, device)), runs, warnings)
    if found.metadata is not None:
        if cfg.random_init:
            warnings.append("debias not run: --random-init (debias reads the pretrained weights)")
        else:
            out = Path(cfg.out) / "debias"
            _attempt("debias", lambda: AutomaticRun(run_debias(cfg, out, device), out), runs, warnings)
    return runs, warnings


def _attempt(name: str, run: Callable[[], AutomaticRun], runs: list[AutomaticRun], warnings: list[str]) -> None:
    """``runs.append(run())``; an application that fails becomes a warning naming ``name``, not the end
    of the analysis (an error that is not vitdecomp's own is also printed with its traceback: a bug)."""
    print(f"vitdecomp: {name}: inputs found, running it for the report", file=sys.stderr)
    try:
        runs.append(run())
    except VitDecompError as err:
        warnings.append(f"{name} not run: {one_line(err)}")
    except Exception as err:  # an internal error of one application must not sink the analysis
        traceback.print_exc()
        warnings.append(f"{name} failed (internal error, please report it): {type(err).__name__}: {one_line(err)}")


def run_segment(cfg: AnalysisConfig, models: Models, masks: Path, device: str) -> AppResult:
    """``vitdecomp segment --images IMAGES --masks MASKS`` on the loaded subject (the maps run on the
    CPU: a subject on another device is loaded again there)."""
    from vitdecomp.apps.masks import folder_set
    from vitdecomp.apps.segment import Segment, SegmentConfig

    subject = models.subject
    if device != "cpu":
        subject = load_model_for(cfg.model, cfg.checkpoint, cfg.random_init, "cpu", cfg.seed)
    n = AUTO_SEGMENT_IMAGES if cfg.n_images is None else min(cfg.n_images, AUTO_SEGMENT_IMAGES)
    print(
        f"vitdecomp: segment: the decomposition's map on the first {n} masked images (vitdecomp segment for more "
        "images and the GradCAM / Chefer et al. baselines)",
        file=sys.stderr,
    )
    scfg = SegmentConfig(
        model=cfg.model,
        checkpoint=cfg.checkpoint,
        images=cfg.images,
        masks=masks,
        n_images=n,
        batch_size=AUTO_SEGMENT_BATCH,
        methods=AUTO_SEGMENT_METHODS,
        skip_bad_images=cfg.skip_bad_images,
        progress=cfg.progress,
    )
    data = folder_set(cfg.images, masks, n, cfg.skip_bad_images)  # type: ignore[arg-type]
    return Segment().measure(scfg, subject, data)


def run_debias(cfg: AnalysisConfig, out: Path, device: str) -> AppResult:
    """``vitdecomp debias --images IMAGES`` with ``analyze``'s models and caches."""
    from vitdecomp.apps.debias import Debias, DebiasConfig

    dcfg = DebiasConfig(
        images=cfg.images,  # type: ignore[arg-type]
        model=cfg.model,
        reader=cfg.reader,
        checkpoint=cfg.checkpoint,
        reader_checkpoint=cfg.reader_checkpoint,
        out=out,
        cache_dir=cfg.cache_path,
        device=device,
        align_steps=cfg.align_steps,
        progress=cfg.progress,
    )
    return Debias().run(dcfg)
