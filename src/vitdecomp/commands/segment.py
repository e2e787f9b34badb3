"""``vitdecomp segment``: zero-shot segmentation from token contributions against GradCAM and Chefer
et al., scored on masks (:class:`vitdecomp.apps.segment.Segment`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import config_of, run_application
from vitdecomp.commands.options import OUTPUT, RUN, SUBJECT, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import SEGMENT_BATCH_SIZE, SEGMENT_OUT, SEGMENT_SHOW, SHOW_SEED

DESCRIPTION = (
    "Relevance maps of the model's own prediction from the decomposition's token contributions, GradCAM and "
    "Chefer et al.'s rollout, scored against object masks (pixel accuracy, mIoU, cumulative foreground IoU, "
    "mAP). Masks: non-zero = object, matched to images by file stem. --mat reads ImageNet-segmentation's "
    "gtsegs_ijcv.mat and prints the published figures beside this run's (also benchmark.json). Writes "
    "segment.json, metrics.md, segment.png and segment.section.json to --out. See docs/applications.md."
)
SHARED = (*SUBJECT, "images", "n_images", "skip_bad_images", "seed", "batch_size", *RUN, "report", *OUTPUT)
METHODS = "decomposition,gradcam,chefer"
OWN = (
    Option("masks", "folder of masks, matched to images by file stem; non-zero = object", metavar="DIR"),
    Option("world", "a `vitdecomp world export` folder (its images/ and masks/)", metavar="DIR"),
    Option(
        "mat",
        "ImageNet-segmentation's gtsegs_ijcv.mat (read with h5py); the published figures are printed beside",
        metavar="FILE",
    ),
    Option(
        "resize",
        "how images and masks enter the model: its own resize/crop, or resized to its input square with no crop "
        "(the published ImageNet-segmentation protocol); auto: square for --mat, else model",
        "auto",
        choices=("auto", "model", "square"),
    ),
    Option(
        "target",
        "which value every map explains: the model's own (predicted), one it does not predict (wrong: the "
        "wrong-prompt test, seeded by --seed), or the image's own representation (self)",
        "auto",
        choices=("auto", "predicted", "wrong", "self"),
    ),
    Option("feature", "zoo models: the logit block --target predicted / wrong explains", "color"),
    Option(
        "contrast",
        "the value's logit against the image's expected alternative (its other values, weighted by the model's "
        "softmax), or the logit alone (none, as the published methods)",
        "expected",
        choices=("expected", "none"),
    ),
    Option("methods", "the map methods compared, comma-separated", METHODS),
    Option("show", "images in the figure", SEGMENT_SHOW, int, metavar="N"),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_shared(p, *SHARED, device="cpu", seed=SHOW_SEED, batch_size=SEGMENT_BATCH_SIZE, out=SEGMENT_OUT)
    add_options(p, *OWN)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.segment import Segment, SegmentConfig

    cfg = config_of(SegmentConfig, args, methods=tuple(w.strip() for w in args.methods.split(",") if w.strip()))
    apply_threads(args.threads, cfg.model)
    return run_application(Segment(), cfg, args, _describe)


def _describe(result: Any, paths: list[Path]) -> str:
    lines = [result.markdown().rstrip("\n")]
    if result.skipped:
        lines.append(
            f"skipped {len(result.skipped)} image(s) (no mask, or unreadable): {', '.join(result.skipped[:3])}"
        )
    if result.resized:
        lines.append(f"resized {len(result.resized)} mask(s) to their image (nearest): {result.resized[0]}")
    if result.benchmark:
        lines += ["", result.benchmark_table().markdown().rstrip("\n")]
    lines.append(f"{', '.join(p.name for p in paths)} in {paths[0].parent}")
    return "\n".join(lines)
