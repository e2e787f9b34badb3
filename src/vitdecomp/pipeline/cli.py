"""The ``analyze`` and ``decompose`` subcommands (registered in :data:`vitdecomp.cli.COMMANDS`).

Building the parsers imports nothing heavy (no torch); the work is imported when a command runs.
Every option is checked before a model is loaded (:meth:`AnalysisConfig.check`,
:func:`check_decompose_args`), so a bad option costs a second, not minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitdecomp.errors import UsageError
from vitdecomp.pipeline.config import AnalysisConfig, check_device, check_model_name, check_writable_dir


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="decompose, align to CLIP, describe and score every component; write an HTML + JSON report",
        description=(
            "The main job: split MODEL's representation of an image set into components, map them into "
            "CLIP space (CompAlign, cached), name each with its top descriptions and score every component "
            "for every feature. With no options: the zoo's DeiT read through the zoo's CLIP on generated "
            "held-out scenes of the built-in world (offline)."
        ),
    )
    AnalysisConfig.add_arguments(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 for zoo models, whose many small ops run fastest on one "
        "thread — 25 s vs 3 min for the default run on 2 busy cores —, torch's choice otherwise)",
    )
    p.set_defaults(func=run_analyze)
    return p


def run_analyze(args: argparse.Namespace) -> int:
    cfg = AnalysisConfig.from_args(args)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give at least 1")
    cfg.check()
    import torch

    from vitdecomp.pipeline.run import run_analysis

    threads = args.threads or (1 if cfg.model.startswith("zoo:") else None)
    if threads:
        torch.set_num_threads(threads)
    result = run_analysis(cfg, checked=True)
    if not cfg.verbose and result.paths is not None:
        print(result.paths.html)
    return 0


def add_decompose_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "decompose",
        help="split a model's representation of some images into its parts; save them with --out",
        description=(
            "Decompose MODEL's representation of the images in --images (default: 8 generated scenes). "
            "With --out DIR, writes DIR/decomposition.safetensors (contributions [N, C, D], representation "
            "[N, D], error [N], and tokens.<i> [N, H, T, D] with --tokens) and DIR/labels.json (component "
            "names, image ids, model); both open without vitdecomp (safetensors.numpy.load_file, json)."
        ),
    )
    p.add_argument("model", help="timm name, hf-hub:ORG/REPO, local-dir:PATH, open_clip:ARCH/TAG, or zoo:NAME")
    p.add_argument("--images", help="folder of images (default: 8 generated scenes of the built-in world)")
    p.add_argument("--n-images", type=int, default=None, help="only the first N images")
    p.add_argument("--out", help="folder to save the decomposition in (safetensors + labels.json)")
    p.add_argument("--random-init", action="store_true", help="random weights instead of pretrained ones")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights (default 0)")
    p.add_argument("--checkpoint", help="local weights file (safetensors) for MODEL")
    p.add_argument("--tokens", action="store_true", help="also split heads over source tokens")
    p.add_argument("--start-layer", type=int, default=0, help="first layer split into components")
    p.add_argument("--representation", default=None, help="which output to decompose (model-specific)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--top", type=int, default=10, help="print the N components with the largest norm")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--runner", choices=("local", "ray"), default="local", help="this process, or Ray actors (vitdecomp[scale])"
    )
    p.add_argument("--address", default=None, help="--runner ray: the Ray cluster to join (default: a local one)")
    p.add_argument("--workers", type=int, default=2, help="--runner ray: actors, each with its own model")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="--runner ray: CPUs per actor")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="--runner ray: GPUs per actor")
    p.set_defaults(func=run_decompose)
    return p


def check_decompose_args(args: argparse.Namespace) -> None:
    """Every option of ``decompose`` that can be checked before loading the model."""
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--start-layer", args.start_layer, 0),
        ("--top", args.top, 0),
        ("--n-images", args.n_images, 1),
        ("--workers", args.workers, 1),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    if args.images is not None and not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images}: no such folder")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    if args.out is not None:
        check_writable_dir(args.out, "--out")
    if args.runner == "ray":
        if args.tokens:
            raise UsageError("--tokens with --runner ray: token splits are not gathered from workers; drop one")
        from vitdecomp.pipeline.runners import require_ray

        require_ray()
    check_device(args.device)
    check_model_name(args.model, pretrained=not args.random_init, checkpoint=args.checkpoint)


def run_decompose(args: argparse.Namespace) -> int:
    check_decompose_args(args)
    from vitdecomp.pipeline.decompose_run import decompose_images

    return decompose_images(args)
