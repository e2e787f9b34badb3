"""``vitdecomp decompose``: split a model's representation of some images into its parts, print the
largest and, with ``--out``, save them (:func:`vitdecomp.pipeline.decompose_set.decompose_images`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from vitdecomp.checks import check_at_least
from vitdecomp.commands._apps import config_of as configured
from vitdecomp.commands.options import (
    DECOMPOSITION,
    OUTPUT,
    RAY_OPTIONS,
    Option,
    add_options,
    add_shared,
    apply_threads,
    check_threads,
)

if TYPE_CHECKING:
    from vitdecomp.components import SetSummary
from vitdecomp.defaults import DECOMPOSE_BATCH_SIZE, MODEL
from vitdecomp.errors import UsageError
from vitdecomp.pipeline.config import N_WORLD_IMAGES, DecomposeConfig

DESCRIPTION = (
    f"Decompose MODEL's representation of the images in --images (default: {N_WORLD_IMAGES} generated scenes). "
    "With --out DIR, writes DIR/decomposition.safetensors (contributions [N, C, D], representation [N, D], "
    "error [N], and tokens.<i> [N, H, T, D] with --tokens) and DIR/labels.json (component names, image ids, "
    "model); both open without vitdecomp (safetensors.numpy.load_file, json)."
)
SHARED = (*DECOMPOSITION, *OUTPUT, *RAY_OPTIONS)
OWN = (
    Option("tokens", "also split heads over source tokens", False, None),
    Option("start_layer", "first layer split into components (earlier layers stay in 'init')", 0, int),
    Option("representation", "which output to decompose (model-specific; default: the paper's)"),
    Option("top", "print the N components with the largest norm", 10, int, metavar="N"),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("model_pos", nargs="?", help=argparse.SUPPRESS, metavar=argparse.SUPPRESS)  # old spelling
    add_shared(p, *SHARED, seed=0, batch_size=DECOMPOSE_BATCH_SIZE)
    add_options(p, *OWN)
    p.set_defaults(func=run)


def config_of(args: argparse.Namespace) -> DecomposeConfig:
    """The typed config of parsed arguments (the model may still be given the old way, as a word)."""
    if args.model_pos is not None and args.model != MODEL:
        raise UsageError(f"the model is given twice ({args.model_pos} and --model {args.model}): give --model only")
    return configured(DecomposeConfig, args, model=args.model_pos or args.model)


def run(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    check_at_least("--top", args.top, 0)
    check_threads(args.threads)
    cfg.check()
    apply_threads(args.threads, cfg.model)
    from vitdecomp.pipeline.decompose_set import decompose_images

    done = decompose_images(cfg)
    _print_summary(done.summary, done.loaded.name, done.loaded.weights_id, args.top, cfg.out, quiet=args.quiet)
    return 0


def _print_summary(s: SetSummary, name: str, weights_id: str, top: int, out: str | None, quiet: bool) -> None:
    import torch

    if quiet:
        if out:
            print(out)
        return
    print(f"{name} ({weights_id}) on {s.n} images")
    print(s.text())
    norms = s.mean_norms()
    print(f"largest components (mean L2 norm over {s.n} images):")
    for i in torch.argsort(norms, descending=True)[:top].tolist():
        print(f"  {s.names[i]:24s} {norms[i].item():10.4f}")
    if out:
        print(f"saved: {out}/decomposition.safetensors (+ labels.json)", file=sys.stdout)
