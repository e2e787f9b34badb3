"""What every application command does around its application: refuse a bad ``--report`` folder
before any work, run, write the result's files (:func:`vitdecomp.report.outputs.write_app_outputs`),
say what was written, and add the result's section to the report when asked."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_application(
    app: Any,
    cfg: Any,
    args: argparse.Namespace,
    describe: Callable[[Any, list[Path]], str] | None = None,
    attach: bool = True,
) -> int:
    """``app.run(cfg)`` as a command: prints ``describe(result, paths)`` (default: its section's summary
    and the files written; ``--quiet``: only the path of its JSON); with ``attach``, ``--report DIR``
    names the ``analyze`` folder whose report gets the result's section."""
    from vitdecomp.report.attach import attach_section, check_report
    from vitdecomp.report.outputs import write_app_outputs

    report = args.report if attach else None
    if report is not None:
        check_report(report)
    result = app.run(cfg)
    paths = write_app_outputs(result, cfg.out, section=attach)
    print(paths[0] if args.quiet else (describe or _written)(result, paths))
    if report is not None:
        print(f"section {result.name!r} added to {attach_section(report, result.section())}")
    return 0


def _written(result: Any, paths: list[Path]) -> str:
    """The result's summary and the files written."""
    return f"{result.section().summary}\n{', '.join(p.name for p in paths)} in {paths[0].parent}"


def config_of(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """A typed config ``cls`` (a dataclass) of the parsed arguments named as its fields, ``progress``
    the opposite of ``--quiet``, and ``extra`` fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names} | extra
    return cls(**kw, progress=not args.quiet) if "progress" in names else cls(**kw)


def analysed(folder: str | Path) -> dict[str, Any]:
    """The ``results.json`` of an ``analyze`` folder as plain JSON (``{}`` when it cannot be read: the
    application then says what is wrong), read without loading anything heavy."""
    try:
        data = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def analysed_model(folder: str | Path) -> str:
    """The analysed subject's name (for the thread rule), ``""`` when unknown."""
    model = analysed(folder).get("model")
    return str(model.get("name", "")) if isinstance(model, dict) else ""
