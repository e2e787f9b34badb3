"""``vitdecomp ablate``: where the representation is formed, and what a feature's top components do
(:class:`vitdecomp.apps.layer_ablation.LayerAblation`)."""

from __future__ import annotations

import argparse

from vitdecomp.commands._apps import config_of, run_application
from vitdecomp.commands.options import ANALYSED, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import ABLATE_KS, ABLATE_N_IMAGES, ABLATE_OUT, N_RANDOM, WORLD_SEED

DESCRIPTION = (
    "Layer ablation: every component of the last n layers is mean-ablated (n = 0 .. L) and the representation "
    "is read by a linear probe per feature (and by the model's own head, or zero-shot for a CLIP). Per "
    "feature, its top k components are mean-ablated against k random ones. Labels: generated world scenes, a "
    "world export folder, or --labels CSV (img_filename relative to --images, one column per feature). "
    "Writes ablate.json, ablate.png and ablate.section.json to --out."
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


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_shared(
        p,
        "images",
        "skip_bad_images",
        "n_images",
        "seed",
        *ANALYSED,
        n_images=ABLATE_N_IMAGES,
        seed=WORLD_SEED,
        out=ABLATE_OUT,
    )
    add_options(p, *OWN)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.layer_ablation import AblateConfig, LayerAblation

    cfg = config_of(AblateConfig, args)
    apply_threads(args.threads, cfg.model)
    return run_application(LayerAblation(), cfg, args)
