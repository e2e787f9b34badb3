"""``vitdecomp ablate``: where the representation is formed, and what a feature's top components do
(:class:`vitdecomp.apps.layer_ablation.LayerAblation`)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import run_application
from vitdecomp.commands.options import Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import ABLATE_KS, ABLATE_N_IMAGES, ABLATE_OUT, N_RANDOM, WORLD_SEED

HELP = "mean-ablate layers from the last, and each feature's top components vs random ones"
DESCRIPTION = (
    "Layer ablation: every component of the last n layers is mean-ablated (n = 0 .. L) and the representation "
    "is read by a linear probe per feature (and by the model's own head, or zero-shot for a CLIP). Per "
    "feature, its top k components are mean-ablated against k random ones. Labels: generated world scenes, a "
    "world export folder, or --labels CSV (img_filename relative to --images, one column per feature). "
    "Writes ablate.json, ablate.png and ablate.section.json to --out."
)
SHARED = (
    "images",
    "n_images",
    "seed",
    "model",
    "reader",
    "checkpoint",
    "reader_checkpoint",
    "device",
    "threads",
    "cache_dir",
    "align_steps",
    "report",
    "out",
    "quiet",
)


def _ks(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)`` (positive integers)."""
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers of components")
    return ks


OWN = (
    Option("labels", "CSV: img_filename (relative to --images) + one column per feature", metavar="CSV"),
    Option("ks", "numbers of top components ablated per feature, comma-separated", ABLATE_KS, _ks, metavar="K,K"),
    Option("n_random", "random draws per k", N_RANDOM, int, metavar="N"),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ablate", help=HELP, description=DESCRIPTION)
    add_shared(p, *SHARED, n_images=ABLATE_N_IMAGES, seed=WORLD_SEED, out=ABLATE_OUT)
    add_options(p, *OWN)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.layer_ablation import AblateConfig, LayerAblation

    names = {f.name for f in fields(AblateConfig)}
    cfg = AblateConfig(**{k: v for k, v in vars(args).items() if k in names}, progress=not args.quiet)
    apply_threads(args.threads, cfg.model)
    return run_application(LayerAblation(), cfg, args, _describe)


def _describe(result: Any, paths: list[Path]) -> str:
    import numpy as np

    curve = ", ".join(f"{np.mean(list(p.probe.values())):.3f}" for p in result.layers)
    return f"{result.model}: mean probe accuracy with 0..{len(result.layers) - 1} layers removed: {curve}; {paths[0]}"
