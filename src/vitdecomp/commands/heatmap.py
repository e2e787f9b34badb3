"""``vitdecomp heatmap``: where in each image the chosen heads write along a text
(:class:`vitdecomp.apps.heatmap.Heatmaps`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import analysed_model, run_application
from vitdecomp.commands.options import OUTPUT, RUN, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import ANALYSIS_DIR, HEATMAP_OUT

DESCRIPTION = (
    "For each image, where the chosen heads favour the text over what the image shows instead: their per-token "
    "contributions, aligned into CLIP space and projected on the texts of the text's feature, the text read against "
    "the image's own alternative (the value its whole representation reads as, or the feature's other values when "
    "it reads as the text's) and shrunk by the image's null, so that a text the image does not match gets no "
    "positive map on its object; placed on each token's pixels and mapped back onto the original image. --feature F "
    "without --text maps, per image, the value of F the whole representation reads best (no labels); a text that "
    "reads as no value of any feature is read against every feature's values and says so. Writes <image>.png, "
    "<image>.npy (the map in the original image's pixels) and heatmaps.json to --out."
)
SHARED = ("skip_bad_images", "checkpoint", *RUN, "report", *OUTPUT)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("images", nargs="*", help="image files (default: 4 generated world scenes)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='a description, e.g. "a red object"')
    what.add_argument("--feature", help="a feature of the analysis: per image, its best-matching value")
    add_options(
        p, Option("heads", "auto (the top 2 ceil(sqrt(H)) heads by score) or head names, comma-separated", "auto")
    )
    add_shared(p, *SHARED, device="cpu", report=ANALYSIS_DIR, out=HEATMAP_OUT)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.heatmap import HeatmapConfig, Heatmaps

    heads = args.heads if args.heads == "auto" else tuple(h.strip() for h in args.heads.split(",") if h.strip())
    cfg = HeatmapConfig(
        images=tuple(args.images),
        skip_bad_images=args.skip_bad_images,
        text=args.text,
        feature=args.feature,
        heads=heads,
        analysis=args.report,
        checkpoint=args.checkpoint,
        device=args.device,
        out=args.out,
    )
    apply_threads(args.threads, analysed_model(args.report))
    return run_application(Heatmaps(), cfg, args, _describe, attach=False)


def _describe(result: Any, paths: list[Path]) -> str:
    return f"{len(result.maps)} heatmaps in {paths[0].parent}"
