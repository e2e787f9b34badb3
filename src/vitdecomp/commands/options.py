"""The options more than one command takes, declared once: :class:`SharedOptions`.

Each field is one option: its type (from the annotation), its default (from
:mod:`vitdecomp.defaults`), its flag, its help line and any old spelling it still accepts (hidden from
``--help``). A command adds the ones it takes with :func:`add_shared` (``add_shared(p, "model",
"reader", "out", out="vitdecomp-debias")``), so the same option has the same name, help and type
everywhere. A command may give an option its own default only where the option's meaning needs it
(which folder ``--out`` is, how many images a batch holds, which seed a command draws from); the
help line then shows that default.

The command's own options are :class:`Option` rows (:func:`add_options`). Building a parser imports
nothing heavy: ``vitdecomp COMMAND --help`` never imports torch.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from vitdecomp.defaults import ALIGN_STEPS, MODEL, READER, STORE_DTYPES


def _opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[str] = (),
    metavar: str | None = None,
    unset: str | None = None,
) -> Any:
    """A field of :class:`SharedOptions`: its default and how it appears on the command line
    (``unset``: what the help says the command does when a ``None`` default is not given)."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": tuple(choices), "metavar": metavar}
    return field(default=default, metadata=meta | {"unset": unset})


@dataclass(frozen=True)
class SharedOptions:
    """Every option more than one command takes, as typed values (see the module text)."""

    model: str = _opt(
        MODEL, "subject model: a timm name, hf-hub:ORG/REPO, local-dir:PATH, open_clip:ARCH/TAG or zoo:NAME"
    )
    reader: str | None = _opt(
        READER, "CLIP model that reads the components (it supplies the text space)", flag="--clip", metavar="MODEL"
    )
    checkpoint: str | None = _opt(None, "local weights file (safetensors) for --model", metavar="FILE")
    reader_checkpoint: str | None = _opt(
        None, "local weights file (safetensors) for --clip", flag="--clip-checkpoint", metavar="FILE"
    )
    random_init: bool = _opt(False, "random weights instead of pretrained ones (tests and smoke runs)")
    device: str | None = _opt(None, "torch device, e.g. cpu, cuda, cuda:1", unset="cuda if available, else cpu")
    dtype: str = _opt("float32", "storage type of the stored contributions", choices=STORE_DTYPES)
    threads: int | None = _opt(
        None,
        "torch intra-op threads (default: 1 for zoo models, whose many small ops run fastest on one thread; "
        "torch's choice otherwise)",
        metavar="N",
    )
    images: str | None = _opt(
        None, "folder of images, read recursively (a world export folder: its images/)", metavar="DIR"
    )
    n_images: int | None = _opt(
        None,
        "number of images: at most this many of a folder, or this many generated scenes",
        aliases=["--n"],
        metavar="N",
    )
    skip_bad_images: bool = _opt(False, "skip unreadable images (and list them) instead of stopping")
    batch_size: int | None = _opt(None, "images per batch", aliases=["--batch"], metavar="N")
    seed: int | None = _opt(None, "seed of what the command draws at random", metavar="N")
    cache_dir: str | None = _opt(
        None, "stores, aligners and text embeddings (default: $VITDECOMP_CACHE or ~/.cache/vitdecomp)", metavar="DIR"
    )
    align_steps: int = _opt(
        ALIGN_STEPS, "most CompAlign steps (early-stopped on held-out images; 0: untrained)", metavar="N"
    )
    report: str | None = _opt(
        None,
        "an `analyze` output folder (its --out): heatmap and retrieve read the analysis in it; segment, debias "
        "and ablate add their section to its report",
        aliases=["--analysis"],
        metavar="DIR",
    )
    out: str | None = _opt(None, "output folder", metavar="DIR")
    quiet: bool = _opt(False, "no progress bars; print only where the outputs are (warnings on stderr)")
    runner: str = _opt(
        "local",
        "who decomposes the images: this process, or Ray actors (pip install 'vitdecomp[scale]')",
        choices=("local", "ray"),
    )
    address: str | None = _opt(None, "--runner ray: the Ray cluster to join (default: start a local one)")
    workers: int = _opt(2, "--runner ray: actors, each with its own copy of the models", metavar="N")
    cpus_per_worker: float = _opt(1.0, "--runner ray: CPUs per actor", metavar="N")
    gpus_per_worker: float = _opt(0.0, "--runner ray: GPUs per actor (> 0: run on a GPU)", metavar="N")


#: Options several commands take together.
RAY_OPTIONS = ("runner", "address", "workers", "cpus_per_worker", "gpus_per_worker")
SUBJECT = ("model", "checkpoint")
READER = ("reader", "reader_checkpoint")
RUN = ("device", "threads")
OUTPUT = ("out", "quiet")
#: What the commands that decompose an image set take (analyze, decompose).
DECOMPOSITION = (*SUBJECT, "random_init", "images", "n_images", "skip_bad_images", "seed", "batch_size", *RUN)
#: What the applications that analyse an image set take (debias, ablate): as ``analyze``.
ANALYSED = (*SUBJECT, *READER, *RUN, "cache_dir", "align_steps", "report", *OUTPUT)


#: A default that says "the command requires this option".
REQUIRED: Any = object()


@dataclass(frozen=True)
class Option:
    """A command's own option: ``dest``, help line, default (:data:`REQUIRED`: none, must be given),
    type (``None``: a flag that flips ``default``), choices, ``flag`` (default ``--`` + dest),
    ``metavar`` and ``aliases`` (old spellings, accepted but not shown)."""

    dest: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = str
    choices: Sequence[Any] = ()
    flag: str | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()


def flag_of(dest: str) -> str:
    """The flag of a shared option."""
    f = next(f for f in fields(SharedOptions) if f.name == dest)
    return f.metadata["flag"] or "--" + dest.replace("_", "-")


def add_shared(parser: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """Add the shared options ``names`` to ``parser`` (``defaults``: a command's own default for some)."""
    hints = typing.get_type_hints(SharedOptions)
    by_name = {f.name: f for f in fields(SharedOptions)}
    for name in names:
        f, meta = by_name[name], by_name[name].metadata
        default = defaults.get(name, f.default)
        kind = None if hints[name] is bool else _cli_type(hints[name])
        text = f"{meta['help']} (default: {meta['unset']})" if default is None and meta["unset"] else meta["help"]
        option = Option(name, text, default, kind, meta["choices"], flag_of(name), meta["metavar"])
        add_options(parser, replace(option, aliases=meta["aliases"]))
    unknown = set(defaults) - set(names)
    if unknown:
        raise ValueError(f"defaults for options not added: {sorted(unknown)}")


def add_options(parser: argparse.ArgumentParser, *options: Option) -> None:
    """Add a command's options; the help line shows a default that is neither unset nor a flag's."""
    for o in options:
        flag = o.flag or "--" + o.dest.replace("_", "-")
        show = o.default is not None and o.default is not REQUIRED and not isinstance(o.default, bool)
        text = f"{o.help} (default: {_shown(o.default)})" if show else o.help
        kw: dict[str, Any] = {"dest": o.dest, "help": text}
        kw |= {"required": True} if o.default is REQUIRED else {"default": o.default}
        if o.type is None:
            kw["action"] = "store_false" if o.default else "store_true"
        else:
            kw["type"] = o.type
            kw["metavar"] = o.metavar or flag.lstrip("-").upper().replace("-", "_")
            if o.choices:
                kw["choices"] = o.choices
        parser.add_argument(flag, **kw)
        for alias in o.aliases:  # an old spelling: accepted, not shown
            hidden = {k: v for k, v in kw.items() if k in ("dest", "type", "action")}
            parser.add_argument(alias, **hidden, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _cli_type(hint: Any) -> Callable[[str], Any]:
    """The command-line type of a field: the first non-``None`` member of its union."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin not in (str, int, float):
        raise TypeError(f"no command-line type for {hint!r}")
    return origin


def check_threads(threads: int | None) -> None:
    """``--threads`` is at least 1 when given."""
    from vitdecomp.errors import UsageError

    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: give at least 1")


def apply_threads(threads: int | None, model: str) -> None:
    """The one thread rule of every command that runs a model: ``threads`` when given (at least 1),
    else 1 for a zoo model (its many small ops run fastest on one thread: 25 s vs 3 min for the
    default analysis on 2 busy cores), else torch's choice."""
    check_threads(threads)
    n = threads or (1 if model.startswith("zoo:") else None)
    if n:
        import torch

        torch.set_num_threads(n)
