"""The ``vitdecomp`` command: one entry point, one subcommand per job.

Every subcommand is one row of :data:`COMMANDS`: its name, its one-line help and the function that
adds its parser (``add_parser(subparsers)``, which sets ``func`` on its arguments), named as
``"module:function"`` so that only the chosen subcommand's module is imported (``vitdecomp
--help`` and ``vitdecomp analyze --help`` do not import torch). To add a subcommand, add a row.

The error contract (see :mod:`vitdecomp.errors`): a :class:`~vitdecomp.errors.VitDecompError`
prints ``vitdecomp: error: <one line>`` and exits with 2, as argparse does for a bad option; an
``OSError`` of the file system (no space, no permission) prints one line naming the path, exit 2;
anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from vitdecomp import __version__
from vitdecomp.errors import VitDecompError, one_line


@dataclass(frozen=True)
class Command:
    """A subcommand: ``name``, one-line ``help`` and ``add_parser`` (``"module:function"`` or a callable
    taking the subparsers object)."""

    name: str
    help: str
    add_parser: str | Callable[[argparse._SubParsersAction], object]

    def register(self, subparsers: argparse._SubParsersAction) -> None:
        add = self.add_parser
        if isinstance(add, str):
            module, _, function = add.partition(":")
            add = getattr(importlib.import_module(module), function)
        add(subparsers)


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: list[Command] = [
    Command(
        "analyze",
        "decompose, align to CLIP, describe and score every component; write an HTML + JSON report",
        "vitdecomp.pipeline.cli:add_analyze_parser",
    ),
    Command(
        "decompose",
        "split a model's representation of some images into its parts; save them with --out",
        "vitdecomp.pipeline.cli:add_decompose_parser",
    ),
    Command(
        "heatmap",
        "where in each image the chosen heads write along a text: PNG overlays + .npy maps",
        "vitdecomp.apps.heatmap:add_heatmap_parser",
    ),
    Command(
        "retrieve",
        "search an analysed image set by text or by example, through a feature's components",
        "vitdecomp.apps.retrieval:add_retrieve_parser",
    ),
    Command(
        "debias",
        "remove a spurious feature by mean-ablating the components that carry it (Waterbirds layout)",
        "vitdecomp.apps.debias:add_debias_parser",
    ),
    Command(
        "ablate",
        "mean-ablate layers from the last, and each feature's top components vs random ones",
        "vitdecomp.apps.ablate:add_ablate_parser",
    ),
    Command(
        "segment",
        "zero-shot segmentation from token contributions vs GradCAM and Chefer et al., scored on masks",
        "vitdecomp.apps.segment:add_segment_parser",
    ),
    Command("world", "the built-in generated world (scenes with ground truth)", "vitdecomp.world.cli:add_world_parser"),
    Command("zoo", "the shipped small models: list them, train them again", "vitdecomp.zoo.cli:add_zoo_parser"),
    Command(
        "validate",
        "check every component score against causal, probe and planted ground truths (docs/validation.md)",
        "vitdecomp.evaluation.cli:add_validate_parser",
    ),
]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the contract of :mod:`vitdecomp.errors`), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the subcommand it names gets its full parser (the others are
    listed with their help), so only that subcommand's module is imported. ``None``: every one."""
    parser = Parser(
        prog="vitdecomp",
        description="Decompose vision transformers' image representations into their parts and read them with text.",
    )
    parser.add_argument("--version", action="version", version=f"vitdecomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for cmd in COMMANDS:
        if chosen is None or cmd.name == chosen:
            cmd.register(sub)
        else:
            sub.add_parser(cmd.name, help=cmd.help)
    return parser


def _chosen(argv: Sequence[str] | None) -> str | None:
    """The subcommand ``argv`` names (its first word that is one), ``""`` if none, ``None`` if no argv."""
    if argv is None:
        return None
    names = {c.name for c in COMMANDS}
    return next((a for a in argv if a in names), "")


#: File-system errors that are the user's to fix (a full disk, a folder they cannot write).
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VitDecompError as err:
        print(f"vitdecomp: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        from vitdecomp.fsio import os_error_message

        print(f"vitdecomp: error: {os_error_message(err, err.filename or '?')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitdecomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
