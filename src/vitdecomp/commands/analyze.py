"""``vitdecomp analyze``: the main job (:func:`vitdecomp.analyze.run_analysis`) from the command line.

Its flags are the shared options (:mod:`vitdecomp.commands.options`) and its own, whose defaults are
:class:`~vitdecomp.pipeline.config.AnalysisConfig`'s; :func:`config_of` reads them back into that
typed config, which is checked before any model loads.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from vitdecomp.commands._apps import config_of as configured
from vitdecomp.commands.options import (
    DECOMPOSITION,
    OUTPUT,
    RAY_OPTIONS,
    READER,
    Option,
    add_options,
    add_shared,
    apply_threads,
    check_threads,
)
from vitdecomp.defaults import ANALYSIS_DIR, BATCH_SIZE, WORLD_SEED
from vitdecomp.pipeline.config import CONFIDENCE_CHOICES, AnalysisConfig

DESCRIPTION = (
    "The main job: split MODEL's representation of an image set into components, map them into CLIP space "
    "(CompAlign, cached), name each with its top descriptions and score every component for every feature. "
    "With no options: the zoo's DeiT read through the zoo's CLIP on 2000 generated held-out scenes of the "
    "built-in world (offline)."
)
SHARED = (*DECOMPOSITION, *READER, "dtype", "cache_dir", "align_steps", *OUTPUT, *RAY_OPTIONS)


def _own() -> list[Option]:
    d = {f.name: f.default for f in fields(AnalysisConfig)}
    return [
        Option(
            "features",
            "feature set: a name (paper, world, waterbirds), a JSON file {feature: [descriptions]} or that JSON itself",
        ),
        Option("vocabulary", "vocabulary the descriptions are picked from: a name (world, general) or a .txt file"),
        Option(
            "start_layer", "first layer split into components (earlier layers stay in 'init')", d["start_layer"], int
        ),
        Option("aligner", "folder of a saved aligner to use instead of the cached or trained one", metavar="DIR"),
        Option("lam", "weight of CompAlign's orthogonality penalty (1: the published setting)", d["lam"], float),
        Option("align_batch_size", "images per CompAlign step", d["align_batch_size"], int),
        Option("val_fraction", "share of the images held out for CompAlign's early stopping", d["val_fraction"], float),
        Option("top_k", "descriptions per component", d["top_k"], int),
        Option("n_top_images", "images shown per component", d["n_top_images"], int),
        Option(
            "confidence",
            "scores given bootstrap intervals and a null: the one the report ranks by, every score "
            "(slower: the text-taught probe is fitted again per null draw), or none",
            d["confidence"],
            str,
            CONFIDENCE_CHOICES,
        ),
        Option(
            "apps",
            "skip the applications whose inputs are in --images (masks/, metadata.csv)",
            d["apps"],
            None,
            flag="--no-apps",
        ),
    ]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_shared(p, *SHARED, out=ANALYSIS_DIR, seed=WORLD_SEED, batch_size=BATCH_SIZE)
    add_options(p, *_own())
    p.set_defaults(func=run)


def config_of(args: argparse.Namespace) -> AnalysisConfig:
    """The typed config of parsed arguments (``--quiet``: no progress bars and no summary)."""
    return configured(AnalysisConfig, args, verbose=not args.quiet)


def run(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    check_threads(args.threads)
    if cfg.progress:  # the first seconds go to importing torch: say so
        print("vitdecomp: analyze: checking the options (imports torch)", flush=True)
    cfg.check()
    apply_threads(args.threads, cfg.model)
    from vitdecomp.allocator import return_large_blocks
    from vitdecomp.analyze import run_analysis

    return_large_blocks()  # a long streaming job: freed buffers go back to the OS (allocator.py)

    result = run_analysis(cfg, checked=True)
    if not cfg.verbose and result.paths is not None:
        print(result.paths.html)
    return 0
