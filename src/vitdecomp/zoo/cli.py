"""``vitdecomp zoo list`` and ``vitdecomp zoo train [NAME ...]``.

The main CLI calls :func:`add_zoo_parser`.
"""

from __future__ import annotations

import argparse

#: Training order: ``clip`` distils from ``deit``, so ``deit`` comes first.
TRAIN_ORDER = ("deit", "clip", "swin", "maxvit", "dino")


def add_zoo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("zoo", help="the shipped small models trained on the built-in world")
    sub = p.add_subparsers(dest="zoo_command", required=True)
    ls = sub.add_parser("list", help="print the zoo models with their cards' headline numbers")
    ls.add_argument("--json", action="store_true", help="print the full cards as JSON")
    ls.set_defaults(func=run_list)
    tr = sub.add_parser("train", help="retrain zoo models from scratch (reproducible; overwrites the weights)")
    tr.add_argument("names", nargs="*", help=f"models to train (default: all, in the order {' '.join(TRAIN_ORDER)})")
    tr.add_argument("--no-eval", action="store_true", help="skip the held-out measurements")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.add_argument("--threads", type=int, help="torch CPU threads (on a shared, busy machine 1 is much faster than 2)")
    tr.add_argument("--out", help="write weights/ and cards/ under this folder instead of the package")
    tr.set_defaults(func=run_train)
    return p


def run_list(args: argparse.Namespace) -> int:
    import json

    from vitdecomp.zoo.hub import list_zoo

    cards = list_zoo()
    if args.json:
        print(json.dumps(cards, indent=1))
        return 0
    for c in cards:
        m = c.get("metrics", {})
        parts = [f"zoo:{c['name']:<7}", c.get("family", c.get("config", {}).get("family", ""))]
        if "params" in c:
            parts.append(f"{c['params'] / 1e6:.2f}M params")
        if m.get("probe"):
            parts.append("probe " + " ".join(f"{k}={100 * v:.1f}" for k, v in m["probe"].items()))
        if "task_min" in m:
            parts.append(f"task(min)={100 * m['task_min']:.1f}")
        if "zero_shot_min" in m:
            parts.append(f"zero-shot(min)={100 * m['zero_shot_min']:.1f} R@1={100 * m['r1_image_to_caption']:.1f}")
        if not c.get("weights_present"):
            parts.append("(weights missing: vitdecomp zoo train " + c["name"] + ")")
        print("  ".join(parts))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitdecomp.zoo.models import ZOO_NAMES
    from vitdecomp.zoo.train import train_and_save

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = args.names or list(TRAIN_ORDER)
    unknown = [n for n in names if n not in ZOO_NAMES]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; choose from {list(ZOO_NAMES)}")
    names = [n for n in TRAIN_ORDER if n in names]
    out = Path(args.out) if args.out else None
    for name in names:
        card = train_and_save(
            name,
            progress=not args.quiet,
            evaluate=not args.no_eval,
            weights_dir=out / "weights" if out else None,
            cards_dir=out / "cards" if out else None,
        )
        print(f"zoo:{name} trained in {card['training']['train_time_s'] / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m vitdecomp.zoo.cli list``)."""
    import sys

    parser = argparse.ArgumentParser(prog="vitdecomp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_zoo_parser(sub)
    args = parser.parse_args(["zoo", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
