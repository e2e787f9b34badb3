"""The ``applications`` stage of ``vitdecomp analyze``: the applications whose inputs are in the image
folder, each run and turned into a section of the report (:class:`~vitdecomp.results.AppSection`).

What is looked for (:func:`detect_applications`), and nothing else, so that no guess is made:

``segment``  a masks folder, ``IMAGES/masks`` or, when the folder is named ``images/`` (as a world
             export's), the ``masks/`` beside it: :func:`vitdecomp.apps.segment.segment` on the masked images with
             every map method (at most ``--n-images`` images), reusing the subject model ``analyze`` loaded.
``debias``   ``IMAGES/metadata.csv`` with the Waterbirds columns (``img_filename, y, split, place``):
             :func:`vitdecomp.apps.debias.run_debias` with ``analyze``'s models, cache and CompAlign
             steps; it reads the store and aligner ``analyze`` just cached when ``analyze`` ran on the
             whole folder with the default start layer and store type, else builds its own. Not with
             ``--random-init`` (debias reads pretrained weights). Its files go to ``OUT/debias/``.

An application that fails on its input is a warning of the run, not the end of it. ``--no-apps``
skips the stage. ``vitdecomp ablate`` needs no more than the images but costs as much as another
analysis, so it is not run here: add it with ``vitdecomp ablate ... --report OUT``.
"""

from __future__ import annotations

import csv
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitdecomp.errors import VitDecompError
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.stages import Models, load_model_for
from vitdecomp.results import AppSection

WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")


@dataclass(frozen=True)
class Found:
    """The application inputs in an image folder: ``masks`` folder and Waterbirds ``metadata`` file."""

    masks: Path | None = None
    metadata: Path | None = None


def detect_applications(images: str | Path | None) -> Found:
    """What :mod:`this stage <vitdecomp.pipeline.applications>` runs on ``images`` (``None``: the
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


def run_applications(cfg: AnalysisConfig, models: Models, device: str) -> tuple[list[AppSection], list[str]]:
    """The sections of the applications found in ``cfg.images`` and a warning per one that failed."""
    found = detect_applications(cfg.images)
    sections: list[AppSection] = []
    warnings: list[str] = []
    if found.masks is not None:
        _attempt("segment", lambda: segment_section(cfg, models, found.masks, device), sections, warnings)
    if found.metadata is not None:
        if cfg.random_init:
            warnings.append("debias not run: --random-init (debias reads the pretrained weights)")
        else:
            _attempt("debias", lambda: debias_section(cfg, device), sections, warnings)
    return sections, warnings


def _attempt(name: str, run: Callable[[], AppSection], sections: list[AppSection], warnings: list[str]) -> None:
    """``sections.append(run())``; a :class:`VitDecompError` becomes a warning naming ``name``."""
    print(f"vitdecomp: {name}: inputs found, running it for the report", file=sys.stderr)
    try:
        sections.append(run())
    except VitDecompError as err:
        warnings.append(f"{name} not run: {err}")


def segment_section(cfg: AnalysisConfig, models: Models, masks: Path, device: str) -> AppSection:
    """``vitdecomp segment --images IMAGES --masks MASKS`` on the loaded subject (the maps run on the
    CPU: a subject on another device is loaded again there), as a section."""
    from vitdecomp.apps.segment import folder_set, segment

    subject = models.subject
    if device != "cpu":
        subject = load_model_for(cfg.model, cfg.checkpoint, cfg.random_init, "cpu", cfg.seed)
    result = segment(subject, folder_set(cfg.images, masks, cfg.n_images))  # type: ignore[arg-type]
    parts = ["vitdecomp", "segment", "--model", cfg.model, "--images", str(cfg.images), "--masks", str(masks)]
    result.command = shlex.join(parts + (["--n", str(cfg.n_images)] if cfg.n_images else []))
    return result.section()


def debias_section(cfg: AnalysisConfig, device: str) -> AppSection:
    """``vitdecomp debias --images IMAGES`` with ``analyze``'s models and caches, as a section."""
    from vitdecomp.apps.debias import DebiasConfig, run_debias

    dcfg = DebiasConfig(
        images=cfg.images,  # type: ignore[arg-type]
        model=cfg.model,
        reader=cfg.reader,
        out=Path(cfg.out) / "debias",
        cache_dir=cfg.cache_path,
        device=device,
        checkpoint=cfg.checkpoint,
        align_steps=cfg.align_steps,
        progress=cfg.progress,
    )
    return run_debias(dcfg).section()
