"""``python -m vitdecomp.commands.validate_features``: the ground truth of ``vitdecomp features`` on the
built-in world (:mod:`vitdecomp.evaluation.features`); prints the tables and writes them (and every
figure) to a JSON file. Tooling, not a subcommand of ``vitdecomp``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from vitdecomp.commands.options import Option, add_options, add_shared, apply_threads

MODELS = ("zoo:deit", "zoo:swin", "zoo:clip")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitdecomp.commands.validate_features",
        description="SAE features vs the world's ground truth: detection, names, completeness, location.",
    )
    p.add_argument("--models", nargs="*", default=list(MODELS), help="the models validated (none: the controls only)")
    p.add_argument("--control", nargs="*", default=["zoo:deit"], help="models also run with random weights")
    add_options(
        p,
        Option("train_seed", "world seed of the analysed scenes (the SAE's training images)", 8300, int, metavar="N"),
        Option("test_seed", "world seed of the fresh scenes", 8301, int, metavar="N"),
        Option("pair_seed", "world seed of the counterfactual pairs", 8302, int, metavar="N"),
        Option("n_train", "analysed scenes", 6000, int, metavar="N"),
        Option("n_test", "fresh scenes", 1000, int, metavar="N"),
        Option("n_pairs", "counterfactual pairs per attribute", 512, int, metavar="N"),
        Option("json", "write every figure to this JSON file", metavar="FILE"),
    )
    add_shared(p, "reader", "cache_dir", "threads", "quiet")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vitdecomp.evaluation.features import FeatureRun, summary_table, validate_features, value_table

    apply_threads(args.threads, "zoo:")
    t0, results = time.time(), []
    runs = [(m, False) for m in args.models] + [(m, True) for m in args.control]
    for name, random_init in runs:
        run = FeatureRun(
            name=name,
            train_seed=args.train_seed,
            test_seed=args.test_seed,
            pair_seed=args.pair_seed,
            reader=args.reader,
            n_train=args.n_train,
            n_test=args.n_test,
            n_pairs=args.n_pairs,
            random_init=random_init,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
        results.append(validate_features(run))
        print("\n".join(summary_table(results[-1:])[2:]), flush=True)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"python -m vitdecomp.commands.validate_features {argv_text}", f"({time.time() - t0:.0f} s)", ""]
    lines += [*summary_table(results), ""]
    for r in results:
        lines += value_table(r)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
