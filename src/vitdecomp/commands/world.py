"""``vitdecomp world export``: write generated scenes of the built-in world (PNGs, masks,
attributes.csv), or its Waterbirds-like split, to a folder."""

from __future__ import annotations

import argparse

from vitdecomp.commands.options import REQUIRED, Option, add_options, add_shared


def configure(p: argparse.ArgumentParser) -> None:
    p.description = "The built-in world: generated scenes with ground truth."
    sub = p.add_subparsers(dest="world_command", required=True, metavar="COMMAND")
    e = sub.add_parser(
        "export",
        help="write generated scenes (PNGs, masks, attributes.csv) to a folder",
        description="Write generated scenes (images/, masks/, attributes.csv, world.json) to a folder; with "
        "--waterbirds, the Waterbirds-like split (metadata.csv; --n-images is split 4:1:2 into train/val/test).",
    )
    add_shared(e, "n_images", "seed", "out", "quiet", n_images=1000, seed=0, out=REQUIRED)
    add_options(
        e,
        Option("size", "image side in pixels", 64, int, metavar="PX"),
        Option("distractors", "up to this many distractor objects per image", 0, int, metavar="N"),
        Option("waterbirds", "write the Waterbirds-like split instead (metadata.csv)", False, None),
        Option("corr", "label/place agreement in the train split (--waterbirds)", 0.95, float),
    )
    e.set_defaults(func=run_export)


def check_export(args: argparse.Namespace) -> None:
    """Refuse what the generator cannot make, in one line naming the option (before writing anything)."""
    from vitdecomp.errors import UsageError

    least = 7 if args.waterbirds else 1  # --waterbirds: 4:1:2, every split needs an image
    checks = [
        (args.n_images >= least, f"--n-images {args.n_images}: give at least {least}"),
        (args.size >= 16, f"--size {args.size}: give at least 16 pixels (a scene's smallest object needs them)"),
        (args.seed >= 0, f"--seed {args.seed}: give a seed of 0 or more"),
        (args.distractors >= 0, f"--distractors {args.distractors}: give 0 or more"),
        (0.0 <= args.corr <= 1.0, f"--corr {args.corr}: give a share between 0 and 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def run_export(args: argparse.Namespace) -> int:
    from vitdecomp.world.export import export_waterbirds, export_world

    check_export(args)
    n = args.n_images
    if args.waterbirds:
        n_train, n_val = n * 4 // 7, n // 7
        n_test = n - n_train - n_val
        out = export_waterbirds(
            args.out, n_train, n_val, n_test, seed=args.seed, size=args.size, corr=args.corr, progress=not args.quiet
        )
        print(f"wrote {n} images ({n_train} train / {n_val} val / {n_test} test) + metadata.csv to {out}")
    else:
        out = export_world(
            n, args.seed, args.out, size=args.size, max_distractors=args.distractors, progress=not args.quiet
        )
        print(f"wrote {n} images, masks and attributes.csv to {out}")
    return 0
