"""``vitdecomp world export`` (argparse); the main CLI calls :func:`add_world_parser`."""

from __future__ import annotations

import argparse

from vitdecomp.world.export import export_waterbirds, export_world


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("world", help="the built-in generated world (scenes with ground truth)")
    sub = p.add_subparsers(dest="world_command", required=True)
    e = sub.add_parser("export", help="write generated scenes (PNGs, masks, attributes.csv) to a folder")
    e.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    e.add_argument("--distractors", type=int, default=0, help="up to this many distractor objects per image")
    e.add_argument(
        "--waterbirds",
        action="store_true",
        help="write the Waterbirds-like split instead (metadata.csv; --n is split 4:1:2 into train/val/test)",
    )
    e.add_argument("--corr", type=float, default=0.95, help="label/place agreement in train (--waterbirds)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_world)
    return p


def run_world(args: argparse.Namespace) -> int:
    if args.waterbirds:
        n_train = args.n * 4 // 7
        n_val = args.n // 7
        n_test = args.n - n_train - n_val
        out = export_waterbirds(
            args.out,
            n_train,
            n_val,
            n_test,
            seed=args.seed,
            size=args.size,
            corr=args.corr,
            progress=not args.quiet,
        )
        print(f"wrote {args.n} images ({n_train} train / {n_val} val / {n_test} test) + metadata.csv to {out}")
    else:
        out = export_world(
            args.n,
            args.seed,
            args.out,
            size=args.size,
            max_distractors=args.distractors,
            progress=not args.quiet,
        )
        print(f"wrote {args.n} images, masks and attributes.csv to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m vitdecomp.world.cli export ...``)."""
    parser = argparse.ArgumentParser(prog="vitdecomp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_world_parser(sub)
    args = parser.parse_args(["world", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
