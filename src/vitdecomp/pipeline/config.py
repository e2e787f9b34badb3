"""The options of one analysis as one typed value: :class:`AnalysisConfig`.

The ``vitdecomp analyze`` command is built from it: :meth:`AnalysisConfig.add_arguments` adds one
flag per field (name, type, default and help taken from the field) and
:meth:`AnalysisConfig.from_args` reads them back, so no option is listed twice. Fields whose
metadata says ``cli=False`` are for the Python API only.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vitdecomp.defaults import DEFAULT_LAMBDA, STORE_DTYPES, WORLD_SEED
from vitdecomp.errors import UsageError
from vitdecomp.fsio import writing


def default_cache_dir() -> Path:
    """``$VITDECOMP_CACHE``, else ``$XDG_CACHE_HOME/vitdecomp``, else ``~/.cache/vitdecomp``."""
    env = os.environ.get("VITDECOMP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vitdecomp"


def _cli(help: str, *, flag: str | None = None, cli: bool = True, choices: Sequence[str] = ()) -> dict[str, Any]:
    """A field's command-line metadata: its ``--help`` text, its flag (default ``--field-name``;
    for a bool, a flag flips the default), whether it has one at all, and its choices."""
    return {"help": help, "flag": flag, "cli": cli, "choices": tuple(choices)}


@dataclass(frozen=True)
class AnalysisConfig:
    """Every option of ``vitdecomp analyze`` / :func:`vitdecomp.pipeline.run_analysis`.

    ``reader`` is the CLIP model whose text space names the components (``--clip``; ``None``: the
    subject must itself be a CLIP model, read through itself). ``images=None`` reads ``n_images``
    (default 2000) generated world scenes from ``seed``; otherwise a folder. ``features`` /
    ``vocabulary`` default to the world's attributes and vocabulary for world scenes, the paper's
    features and the general vocabulary for folders. CompAlign is trained from the store with a
    seeded ``val_fraction`` held out unless an aligner is cached for this model setting or given
    as ``aligner`` (refused if it was trained for another setting).
    """

    model: str = field(default="zoo:deit", metadata=_cli("subject: timm name, open_clip:ARCH/TAG or zoo:NAME"))
    reader: str | None = field(
        default="zoo:clip",
        metadata=_cli("CLIP model that reads the components (supplies the text space)", flag="--clip"),
    )
    images: str | Path | None = field(
        default=None, metadata=_cli("folder of images (default: generated held-out scenes of the built-in world)")
    )
    n_images: int | None = field(default=None, metadata=_cli("number of images (default: 2000 scenes / all)"))
    seed: int = field(default=WORLD_SEED, metadata=_cli("seed of the generated image set and of --random-init weights"))
    out: str | Path = field(default="vitdecomp-out", metadata=_cli("report folder (results.json, index.html)"))
    cache_dir: str | Path | None = field(
        default=None,
        metadata=_cli("stores, aligners and text embeddings (default $VITDECOMP_CACHE or ~/.cache/vitdecomp)"),
    )
    features: str | Path | Mapping[str, Sequence[str]] | None = field(
        default=None, metadata=_cli("feature set name (paper, world, waterbirds) or a JSON file")
    )
    vocabulary: str | Path | None = field(
        default=None, metadata=_cli("vocabulary name (world, general) or a .txt file")
    )
    templates: tuple[str, ...] | None = field(
        default=None, metadata=_cli("prompt templates of descriptions", cli=False)
    )
    start_layer: int = field(
        default=0, metadata=_cli("first layer split into components (earlier layers stay in 'init')")
    )
    batch_size: int = field(default=64, metadata=_cli("images per decomposition batch"))
    dtype: str = field(
        default="float32", metadata=_cli("storage type of the stored contributions", choices=STORE_DTYPES)
    )
    device: str | None = field(default=None, metadata=_cli("default: cuda when available, else cpu"))
    runner: str = field(
        default="local",
        metadata=_cli(
            "who decomposes the images into the store: this process, or Ray actors (pip install 'vitdecomp[scale]')",
            choices=("local", "ray"),
        ),
    )
    address: str | None = field(
        default=None, metadata=_cli("--runner ray: the Ray cluster to join (default: start a local one)")
    )
    workers: int = field(default=2, metadata=_cli("--runner ray: actors, each with its own copy of the models"))
    cpus_per_worker: float = field(default=1.0, metadata=_cli("--runner ray: CPUs per actor"))
    gpus_per_worker: float = field(default=0.0, metadata=_cli("--runner ray: GPUs per actor (> 0: run on a GPU)"))
    checkpoint: str | Path | None = field(default=None, metadata=_cli("local weights file for --model"))
    reader_checkpoint: str | Path | None = field(
        default=None, metadata=_cli("local weights file for --clip", flag="--clip-checkpoint")
    )
    random_init: bool = field(default=False, metadata=_cli("random weights (tests and smoke runs)"))
    aligner: str | Path | None = field(
        default=None, metadata=_cli("folder of a saved aligner to use instead of the cached / trained one")
    )
    lam: float = field(
        default=DEFAULT_LAMBDA, metadata=_cli("weight of CompAlign's orthogonality penalty (1: the published setting)")
    )
    align_steps: int = field(default=3000, metadata=_cli("most CompAlign steps (early-stopped)"))
    align_batch_size: int = field(default=256, metadata=_cli("images per CompAlign step"))
    val_fraction: float = field(
        default=0.1, metadata=_cli("share of the images held out for CompAlign's early stopping")
    )
    top_k: int = field(default=5, metadata=_cli("TextSpan descriptions per component"))
    n_top_images: int = field(default=4, metadata=_cli("images shown per component"))
    skip_bad_images: bool = field(default=False, metadata=_cli("skip unreadable images instead of stopping"))
    apps: bool = field(
        default=True,
        metadata=_cli("skip the applications whose inputs are in --images (masks/, metadata.csv)", flag="--no-apps"),
    )
    progress: bool = field(
        default=True, metadata=_cli("no progress bars, no summary: print the report path", flag="--quiet")
    )
    verbose: bool = field(default=True, metadata=_cli("print what is trained and a summary at the end", cli=False))

    def check(self) -> None:
        """Refuse options that cannot work, before anything heavy runs (:class:`UsageError`, one line)."""
        for name, least in (
            ("n_images", 2),
            ("batch_size", 1),
            ("align_batch_size", 1),
            ("align_steps", 0),
            ("top_k", 1),
            ("n_top_images", 0),
            ("start_layer", 0),
            ("workers", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UsageError(f"{_flag(name)} {value}: must be at least {least}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction}: must lie strictly between 0 and 1")
        if self.runner == "ray":
            from vitdecomp.pipeline.runners import require_ray

            require_ray()
        if not (self.cpus_per_worker > 0 and self.gpus_per_worker >= 0):
            raise UsageError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if not self.lam >= 0.0:
            raise UsageError(f"--lam {self.lam}: must be a number >= 0")
        if self.images is not None and not Path(self.images).is_dir():
            raise UsageError(f"--images {self.images}: no such folder")
        for name in ("checkpoint", "reader_checkpoint"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise UsageError(f"{_flag(name)} {value}: no such file")
        if self.aligner is not None and not (Path(self.aligner) / "aligner.json").is_file():
            raise UsageError(f"--aligner {self.aligner}: no saved aligner there (aligner.json missing)")
        check_device(self.device)
        check_writable_dir(self.out, "--out")
        check_writable_dir(self.cache_path, "--cache-dir")
        self._check_text()
        check_model_name(self.model, pretrained=not self.random_init, checkpoint=self.checkpoint)
        if self.reader is not None:
            check_model_name(self.reader, pretrained=not self.random_init, checkpoint=self.reader_checkpoint)

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

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--n-images`` for ``n_images``, or the field's own ``flag``)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
            if hints[f.name] is bool:  # a flag that flips the default
                kw["action"] = "store_false" if f.default else "store_true"
            else:
                kw["type"] = _cli_type(hints[f.name])
                kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
                if f.metadata["choices"]:
                    kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AnalysisConfig:
        """The config of parsed arguments (fields without a flag keep their defaults; ``--quiet`` also
        turns the summary off)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in vars(args).items() if k in names}
        if kw.get("progress") is False:
            kw["verbose"] = False
        return cls(**kw)


def _flag(name: str) -> str:
    f = next((f for f in fields(AnalysisConfig) if f.name == name), None)
    return (f.metadata.get("flag") if f is not None else None) or "--" + name.replace("_", "-")


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know or this machine does not have."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device}: not a device torch knows ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Make sure ``path`` is (or can be made) a folder this process can write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".vitdecomp-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


def check_model_name(name: str, *, pretrained: bool, checkpoint: str | Path | None = None) -> None:
    """:func:`vitdecomp.models.loading.check_name` (imports timm / open_clip only for their names)."""
    from vitdecomp.models.loading import check_name

    check_name(name, pretrained=pretrained, checkpoint=checkpoint)


def _cli_type(hint: Any) -> type:
    """The command-line type of a field: the first non-``None`` member of its union."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin not in (str, int, float):
        raise TypeError(f"no command-line type for {hint!r}: mark the field cli=False")
    return origin
