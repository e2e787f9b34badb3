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

from vitdecomp.align import DEFAULT_LAMBDA
from vitdecomp.imageset import WORLD_SEED
from vitdecomp.store import DTYPES


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
    seed: int = field(default=WORLD_SEED, metadata=_cli("seed of the generated image set"))
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
        default="float32", metadata=_cli("storage type of the stored contributions", choices=tuple(DTYPES))
    )
    device: str | None = field(default=None, metadata=_cli("default: cuda when available, else cpu"))
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
    progress: bool = field(default=True, metadata=_cli("no progress bars", flag="--quiet"))
    verbose: bool = field(default=True, metadata=_cli("print what is trained and a summary at the end", cli=False))

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
        """The config of parsed arguments (fields without a flag keep their defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _cli_type(hint: Any) -> type:
    """The command-line type of a field: the first non-``None`` member of its union."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin not in (str, int, float):
        raise TypeError(f"no command-line type for {hint!r}: mark the field cli=False")
    return origin
