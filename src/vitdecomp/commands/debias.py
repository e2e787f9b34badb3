"""``vitdecomp debias``: remove a spurious feature by mean-ablating the components that carry it
(:class:`vitdecomp.apps.debias.Debias`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import run_application
from vitdecomp.commands.options import REQUIRED, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import DEBIAS_OUT, N_RANDOM
from vitdecomp.scores.registry import score_names

HELP = "remove a spurious feature by mean-ablating the components that carry it (Waterbirds layout)"
DESCRIPTION = (
    "Waterbirds' recipe: a label spuriously tied to a place in the training split, balanced groups in "
    "validation and test. The components are ranked by score(spurious) - score(core) on the training images, "
    "the top k are mean-ablated (k chosen on validation), and the frozen linear head reads the test split; "
    "controls: k random components, the top k by score(core); references: DFR and, for a CLIP subject, "
    "projecting the spurious texts out. Writes debias.json, debias.png and debias.section.json to --out."
)
SHARED = (
    "images",
    "model",
    "reader",
    "checkpoint",
    "reader_checkpoint",
    "seed",
    "device",
    "threads",
    "cache_dir",
    "align_steps",
    "report",
    "out",
    "quiet",
)


def _own() -> tuple[Option, ...]:
    """The command's own options (the score's choices: the registry's scores when the parser is built)."""
    return (
        Option("metadata", "Waterbirds-layout CSV (img_filename, y, split, place; default: IMAGES/metadata.csv)"),
        Option("features", "JSON file {spurious: [...], core: [...]} (default: the built-in set for the folder)"),
        Option(
            "score",
            "score that ranks the components (auto: every score, the best on validation)",
            "auto",
            choices=("auto", *score_names()),
        ),
        Option("n_random", "random draws of the k-random control", N_RANDOM, int, metavar="N"),
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("debias", help=HELP, description=DESCRIPTION)
    add_shared(p, *SHARED, images=REQUIRED, seed=0, out=DEBIAS_OUT)
    add_options(p, *_own())
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.debias import Debias, DebiasConfig

    names = {f.name for f in fields(DebiasConfig)}
    cfg = DebiasConfig(**{k: v for k, v in vars(args).items() if k in names}, progress=not args.quiet)
    apply_threads(args.threads, cfg.model)
    return run_application(Debias(), cfg, args, _describe)


def _describe(result: Any, paths: list[Path]) -> str:
    b, a = result.before.test, result.after.test
    return (
        f"{result.model}: k={result.k}, test worst group {b.worst:.3f} -> {a.worst:.3f}, average "
        f"{b.average:.3f} -> {a.average:.3f}; DFR {result.reading('DFR').test.worst:.3f}; {paths[0]}"
    )
