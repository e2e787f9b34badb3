"""``python -m vitdecomp.commands.evaluate_apps heatmaps|specificity|rules|retrieval --report DIR``: the
applications measured on the built-in world's ground truth (:mod:`vitdecomp.evaluation.app_heatmaps`,
:mod:`vitdecomp.evaluation.app_specificity`, :mod:`vitdecomp.evaluation.app_retrieval`; the figures of
docs/applications.md). Tooling, not a subcommand of ``vitdecomp``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from vitdecomp.commands.options import REQUIRED, Option, add_options, add_shared
from vitdecomp.defaults import SHOW_SEED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitdecomp.commands.evaluate_apps",
        description="The applications measured on the built-in world's ground truth (masks, attributes).",
    )
    p.add_argument(
        "what",
        choices=["heatmaps", "specificity", "rules", "retrieval"],
        help="what is measured (specificity: right and wrong values, heatmaps and every segmentation method)",
    )
    add_shared(p, "report", "n_images", "seed", report=REQUIRED, n_images=200, seed=SHOW_SEED)
    add_options(p, Option("json", "also write the figures to this JSON file", metavar="FILE"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from vitdecomp.apps.analysis import load_analysis
    from vitdecomp.evaluation.app_heatmaps import heatmap_rules, heatmap_scores
    from vitdecomp.evaluation.app_retrieval import evaluate_world
    from vitdecomp.evaluation.app_specificity import specificity

    analysis = load_analysis(args.report)
    measure = {
        "heatmaps": heatmap_scores,
        "specificity": specificity,
        "rules": heatmap_rules,
        "retrieval": evaluate_world,
    }[args.what]
    with torch.no_grad():
        text = json.dumps(measure(analysis, args.n_images, args.seed), indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
