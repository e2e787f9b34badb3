"""``vitdecomp debias``: remove a spurious feature by mean-ablating the components that carry it
(:class:`vitdecomp.apps.debias.Debias`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import config_of, run_application
from vitdecomp.commands.options import ANALYSED, REQUIRED, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import DEBIAS_OUT, N_RANDOM
from vitdecomp.scores.registry import score_names

DESCRIPTION = (
    "Waterbirds' recipe: a label spuriously tied to a place in the training split, balanced groups in "
    "validation and test. The components are ranked by score(spurious) - score(core) on the training images, "
    "the top k are mean-ablated (k chosen on validation), and the frozen linear head reads the test split; "
    "controls: k random components, the top k by score(core); references: DFR and, for a CLIP subject, "
    "projecting the spurious texts out. Writes debias.json, debias.png and debias.section.json to --out. On the "
    "official Waterbirds folder (metadata.csv with img_id, img_filename, y, split, place, place_filename) the "
    "published figures are printed beside this run's (also benchmark.json)."
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


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_shared(p, "images", "skip_bad_images", "seed", *ANALYSED, images=REQUIRED, seed=0, out=DEBIAS_OUT)
    add_options(p, *_own())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.debias import Debias, DebiasConfig

    cfg = config_of(DebiasConfig, args)
    apply_threads(args.threads, cfg.model)
    return run_application(Debias(), cfg, args, _describe)


def _describe(result: Any, paths: list[Path]) -> str:
    """The result's summary, on the official Waterbirds folder the published figures beside it, the files."""
    lines = [result.section().summary]
    if result.benchmark:
        lines += ["", result.benchmark_table().markdown().rstrip("\n")]
    return "\n".join([*lines, f"{', '.join(p.name for p in paths)} in {paths[0].parent}"])
