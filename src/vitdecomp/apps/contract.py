"""One contract per kind of application, captum-style: a base class runs what every application of
its kind needs, and each application overrides one function, :meth:`measure`.

An application is an algorithm module: an :class:`Application` subclass, its typed config and its
typed result (the :class:`vitdecomp.results.AppResult` contract: ``to_dict`` / ``from_dict``,
``section()`` for the report, ``figures()`` for its plots). No argparse, no HTML, no files: the
command layer (:mod:`vitdecomp.commands`) parses the options, and
:func:`vitdecomp.report.outputs.write_app_outputs` writes a result's files.

Kinds:

* :class:`ComponentApplication` — reads an image set's analysed components, with the store and
  aligner ``vitdecomp analyze`` caches (``debias``, ``ablate``); its config is an
  :class:`AnalysedConfig`. ``measure(cfg, source, analyse)`` gets the image set and a function that
  analyses it (called once the cheap checks passed).
* :class:`ModelApplication` — runs one model on images with masks or labels (``segment``):
  ``measure(cfg, model, data)``.
* :class:`AnalysisApplication` — reads a finished analysis folder (``heatmap``, ``retrieve``):
  ``measure(cfg, analysis)``.

Adding an application: its module (a subclass of one of these, a config, a result), its command
module, and one row of :data:`vitdecomp.commands.COMMANDS`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from vitdecomp.apps.analysis import Analysis, load_analysis
from vitdecomp.apps.mean_ablation import AnalysedComponents, analysed_components
from vitdecomp.checks import default_device
from vitdecomp.defaults import ALIGN_STEPS, ANALYSIS_DIR, MODEL, READER
from vitdecomp.imageset import ImageSource, image_source, skip_report
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.model_pair import load_model_for

C = TypeVar("C")
R = TypeVar("R")


class Application(ABC, Generic[C, R]):
    """An application: ``run(cfg)`` returns its typed result. ``name`` names it (its section, its
    files, its command)."""

    name: ClassVar[str]

    def check(self, cfg: C) -> None:
        """Refuse what can be refused before anything heavy runs (default: nothing)."""

    @abstractmethod
    def run(self, cfg: C) -> R: ...


@dataclass(kw_only=True)
class AnalysedConfig:
    """What an application that reads analysed components shares with ``vitdecomp analyze``: the
    images folder (``skip_bad_images``: skip its unreadable files), the subject and reader models and
    their local weights, the cache, the device, CompAlign's steps, progress bars, and the folder the
    command writes to (``out``)."""

    images: str | Path | None = None
    skip_bad_images: bool = False
    model: str = MODEL
    reader: str | None = READER
    checkpoint: str | Path | None = None
    reader_checkpoint: str | Path | None = None
    out: str | Path = ANALYSIS_DIR
    cache_dir: str | Path | None = None
    device: str | None = None
    align_steps: int = ALIGN_STEPS
    progress: bool = True

    def analysis(self, **extra: Any) -> AnalysisConfig:
        """The pipeline's options for this run (``extra``: further :class:`AnalysisConfig` fields), so
        that it reuses the store and aligner of ``vitdecomp analyze`` on the same images."""
        return AnalysisConfig(
            model=self.model,
            reader=self.reader,
            images=self.images,
            skip_bad_images=self.skip_bad_images,
            out=self.out,
            cache_dir=self.cache_dir,
            device=self.device,
            checkpoint=self.checkpoint,
            reader_checkpoint=self.reader_checkpoint,
            align_steps=self.align_steps,
            progress=self.progress,
            verbose=self.progress,
            **extra,
        )


class ComponentApplication(Application[C, R]):
    """Runs on an image set's analysed components: checks (:meth:`check`, then the analysis
    options), reads the image set, and hands :meth:`measure` the set and a function that analyses it
    (stores, aligns and embeds the text as ``vitdecomp analyze`` does, reusing its caches)."""

    def run(self, cfg: C) -> R:
        self.check(cfg)
        acfg = cfg.analysis()  # type: ignore[attr-defined]
        acfg.check()
        source = image_source(acfg.images, acfg.n_images, acfg.seed, acfg.skip_bad_images, progress=acfg.progress)
        report = skip_report(source)
        if report:
            print(f"vitdecomp: {report}", file=sys.stderr)
        return self.measure(cfg, source, lambda: analysed_components(acfg, source))

    @abstractmethod
    def measure(self, cfg: C, source: ImageSource, analyse: Callable[[], AnalysedComponents]) -> R: ...


class ModelApplication(Application[C, R]):
    """Runs one model on a data set: :meth:`data` reads it first (its errors come before the model
    loads), then the model ``cfg.model`` is loaded (``cfg.checkpoint``, on ``cfg.device``; ``None``:
    CUDA when there is one) and :meth:`measure` runs."""

    def run(self, cfg: C) -> R:
        self.check(cfg)
        data = self.data(cfg)
        c: Any = cfg
        model = load_model_for(c.model, c.checkpoint, device=default_device(c.device))
        return self.measure(cfg, model, data)

    @abstractmethod
    def data(self, cfg: C) -> Any: ...

    @abstractmethod
    def measure(self, cfg: C, model: LoadedModel, data: Any) -> R: ...


class AnalysisApplication(Application[C, R]):
    """Reads a finished analysis (``cfg.analysis``: an ``analyze`` output folder; its models loaded on
    ``cfg.device``, ``None``: CUDA when there is one; the subject from ``cfg.checkpoint`` when it was
    given one) and runs :meth:`measure`."""

    def run(self, cfg: C) -> R:
        self.check(cfg)
        c: Any = cfg
        analysis = load_analysis(c.analysis, device=default_device(c.device), checkpoint=c.checkpoint)
        return self.measure(cfg, analysis)

    @abstractmethod
    def measure(self, cfg: C, analysis: Analysis) -> R: ...
