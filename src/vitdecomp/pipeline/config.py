"""The pipeline's jobs' options as typed values: :class:`AnalysisConfig` (``vitdecomp analyze``) and
:class:`DecomposeConfig` (``vitdecomp decompose``).

Defaults come from :mod:`vitdecomp.defaults`; the ``vitdecomp analyze`` command builds its flags
from the shared options record and these fields (:mod:`vitdecomp.commands.analyze`), and
:meth:`AnalysisConfig.check` refuses what cannot work before anything heavy runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitdecomp.checks import (
    check_at_least,
    check_device,
    check_file,
    check_folder,
    check_model_name,
    check_writable_dir,
    require_ray,
)
from vitdecomp.defaults import (
    ALIGN_BATCH_SIZE,
    ALIGN_STEPS,
    ANALYSIS_DIR,
    BATCH_SIZE,
    DECOMPOSE_BATCH_SIZE,
    DEFAULT_LAMBDA,
    MODEL,
    READER,
    VAL_FRACTION,
    WORLD_SEED,
)
from vitdecomp.errors import UsageError

#: Which scores an analysis measures the confidence of (bootstrap intervals and a null): the score the
#: report ranks by (the default: the only one the page shows intervals for), every score, or none.
CONFIDENCE_CHOICES = ("ranked", "all", "none")

#: The command-line flags whose names are not ``--`` + the field name.
FLAGS = {"reader": "--clip", "reader_checkpoint": "--clip-checkpoint", "progress": "--quiet"}


def default_cache_dir() -> Path:
    """``$VITDECOMP_CACHE``, else ``$XDG_CACHE_HOME/vitdecomp``, else ``~/.cache/vitdecomp``."""
    env = os.environ.get("VITDECOMP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vitdecomp"


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class AnalysisConfig:
    """Every option of ``vitdecomp analyze`` / :func:`vitdecomp.analyze.run_analysis`.

    ``model`` is the subject; ``reader`` the CLIP model whose text space names the components
    (``--clip``; ``None``: the subject must itself be a CLIP model, read through itself).
    ``images=None`` reads ``n_images`` (default 2000) generated world scenes from ``seed`` (which also
    seeds ``random_init`` weights); otherwise a folder. ``features`` (a set name, a JSON file or a
    dict) and ``vocabulary`` (a name or a .txt file) default to the world's attributes and vocabulary
    for world scenes, the paper's features and the general vocabulary for folders; ``templates`` are
    the descriptions' prompt templates. ``start_layer``: earlier layers stay in ``init``. The store
    (``dtype``, filled by this process or Ray actors: ``runner``, ``address``, ``workers``,
    ``cpus_per_worker``, ``gpus_per_worker``) and CompAlign (``lam``, ``align_steps``,
    ``align_batch_size``, ``val_fraction``; trained unless cached for this setting or given as
    ``aligner``, refused if trained for another) are cached under ``cache_dir``. ``top_k``
    descriptions and ``n_top_images`` images per component; ``confidence``: which scores get bootstrap
    intervals and a null (:data:`CONFIDENCE_CHOICES`: the one the report ranks by, every score, none);
    ``apps``: run the applications whose inputs are in the folder; ``progress`` bars and a ``verbose``
    summary.
    """

    model: str = MODEL
    reader: str | None = READER
    images: str | Path | None = None
    n_images: int | None = None
    seed: int = WORLD_SEED
    out: str | Path = ANALYSIS_DIR
    cache_dir: str | Path | None = None
    features: str | Path | Mapping[str, Sequence[str]] | None = None
    vocabulary: str | Path | None = None
    templates: tuple[str, ...] | None = None
    start_layer: int = 0
    batch_size: int = BATCH_SIZE
    dtype: str = "float32"
    device: str | None = None
    runner: str = "local"
    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    checkpoint: str | Path | None = None
    reader_checkpoint: str | Path | None = None
    random_init: bool = False
    aligner: str | Path | None = None
    lam: float = DEFAULT_LAMBDA
    align_steps: int = ALIGN_STEPS
    align_batch_size: int = ALIGN_BATCH_SIZE
    val_fraction: float = VAL_FRACTION
    top_k: int = 5
    n_top_images: int = 4
    confidence: str = "ranked"
    skip_bad_images: bool = False
    apps: bool = True
    progress: bool = True
    verbose: bool = True

    def check(self) -> None:
        """Refuse options that cannot work, before anything heavy runs (:class:`UsageError`, one line)."""
        self._check_numbers()
        if self.runner == "ray":
            require_ray()
        check_folder("--images", self.images)
        for name in ("checkpoint", "reader_checkpoint"):
            check_file(flag(name), getattr(self, name))
        if self.aligner is not None and not (Path(self.aligner) / "aligner.json").is_file():
            raise UsageError(f"--aligner {self.aligner}: no saved aligner there (aligner.json missing)")
        check_device(self.device)
        check_writable_dir(self.out, "--out")
        check_writable_dir(self.cache_path, "--cache-dir")
        self._check_text()
        outside = [m for m in (self.model, self.reader) if m is not None and not m.startswith("zoo:")]
        if self.progress and outside:  # importing timm / open_clip for their names takes seconds: say so
            print(f"vitdecomp: checking the name(s) {', '.join(outside)} (imports timm / open_clip)", flush=True)
        check_model_name(self.model, pretrained=not self.random_init, checkpoint=self.checkpoint)
        if self.reader is not None:
            check_model_name(self.reader, pretrained=not self.random_init, checkpoint=self.reader_checkpoint)

    def _check_numbers(self) -> None:
        for name, least in (
            ("n_images", 2),
            ("batch_size", 1),
            ("align_batch_size", 1),
            ("align_steps", 0),
            ("top_k", 1),
            ("n_top_images", 0),
            ("start_layer", 0),
            ("workers", 1),
            ("seed", 0),
        ):
            check_at_least(flag(name), getattr(self, name), least)
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction}: must lie strictly between 0 and 1")
        if not (self.cpus_per_worker > 0 and self.gpus_per_worker >= 0):
            raise UsageError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if not self.lam >= 0.0:
            raise UsageError(f"--lam {self.lam}: must be a number >= 0")
        if self.confidence not in CONFIDENCE_CHOICES:
            raise UsageError(f"--confidence {self.confidence}: must be one of {', '.join(CONFIDENCE_CHOICES)}")

    def _check_text(self) -> None:
        """The feature set and the vocabulary can be read (and are not empty)."""
        from vitdecomp.scores.features import load_features
        from vitdecomp.text import load_vocabulary

        world = self.images is None
        vocabulary = self.vocabulary if self.vocabulary is not None else ("world" if world else "general")
        try:
            if self.features is not None:
                load_features(self.features)
        except (ValueError, OSError) as err:
            raise UsageError(f"--features {self.features}: {err}") from err
        try:
            vocab = load_vocabulary(vocabulary)
        except (ValueError, OSError) as err:
            raise UsageError(f"--vocabulary {vocabulary}: {err}") from err
        if not vocab:
            raise UsageError(f"--vocabulary {self.vocabulary}: no entries (one description a line)")

    @property
    def cache_path(self) -> Path:
        """The cache folder: ``cache_dir`` or :func:`default_cache_dir`."""
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


#: Generated scenes decomposed when no folder is given.
N_WORLD_IMAGES = 8


@dataclass(frozen=True)
class DecomposeConfig:
    """The options of ``vitdecomp decompose``: the ``model`` (``random_init`` weights drawn from
    ``seed``, or a local ``checkpoint``), the ``images`` (default: 8 generated scenes; the first
    ``n_images``; ``skip_bad_images``), what is split (``tokens``, ``start_layer``,
    ``representation``), how (``batch_size``, ``device``; ``runner="ray"`` with ``address``,
    ``workers``, ``cpus_per_worker``, ``gpus_per_worker``), and where it is saved (``out``)."""

    model: str = MODEL
    images: str | Path | None = None
    n_images: int | None = None
    out: str | Path | None = None
    random_init: bool = False
    seed: int = 0
    checkpoint: str | Path | None = None
    tokens: bool = False
    start_layer: int = 0
    representation: str | None = None
    batch_size: int = DECOMPOSE_BATCH_SIZE
    device: str | None = None
    skip_bad_images: bool = False
    progress: bool = True
    runner: str = "local"
    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def check(self) -> None:
        """Every option that can be checked before loading the model (one-line :class:`UsageError`)."""
        for name, least in (("batch_size", 1), ("start_layer", 0), ("n_images", 1), ("workers", 1), ("seed", 0)):
            check_at_least("--" + name.replace("_", "-"), getattr(self, name), least)
        check_folder("--images", self.images)
        check_file("--checkpoint", self.checkpoint)
        if self.out is not None:
            check_writable_dir(self.out, "--out")
        if self.runner == "ray":
            if self.tokens:
                raise UsageError("--tokens with --runner ray: token splits are not gathered from workers; drop one")
            require_ray()
        check_device(self.device)
        check_model_name(self.model, pretrained=not self.random_init, checkpoint=self.checkpoint)
