"""The ``vitdecomp`` command: one entry point, one subcommand per row of
:data:`vitdecomp.commands.COMMANDS`; :func:`main` parses and runs.

The error contract (see :mod:`vitdecomp.errors`): a :class:`~vitdecomp.errors.VitDecompError`
prints ``vitdecomp: error: <one line>`` and exits with 2, as argparse does for a bad option; an
``OSError`` of the file system (no space, no permission) prints one line naming the path, exit 2;
anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from typing import NoReturn

from vitdecomp import __version__
from vitdecomp.commands import COMMANDS, Command
from vitdecomp.errors import VitDecompError, one_line

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


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
