"""The ``vitdecomp`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image
from tqdm.auto import tqdm

from vitdecomp import decompose, load_model
from vitdecomp.errors import VitDecompError
from vitdecomp.imageset import iter_batches, list_images
from vitdecomp.pipeline import AnalysisConfig, run_analysis
from vitdecomp.world import make_scenes
from vitdecomp.world.cli import add_world_parser
from vitdecomp.zoo.cli import add_zoo_parser


def _add_decompose_parser(sub) -> None:
    p = sub.add_parser(
        "decompose",
        help="split a model's representation of some images into its parts and print a summary",
        description="Decompose MODEL's representation of the images in --images (default: generated scenes).",
    )
    p.add_argument("model", help="timm name, open_clip:ARCH/TAG, or zoo:NAME")
    p.add_argument("--images", help="folder of images (default: 8 generated scenes of the built-in world)")
    p.add_argument("--random-init", action="store_true", help="random weights instead of pretrained ones")
    p.add_argument("--checkpoint", help="local weights file (safetensors) for MODEL")
    p.add_argument("--tokens", action="store_true", help="also split heads over source tokens")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--representation", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--top", type=int, default=10, help="print the N components with the largest norm")
    p.set_defaults(func=_run_decompose)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _run_decompose(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, pretrained=not args.random_init, checkpoint=args.checkpoint, device=args.device)
    if args.images:
        paths = list_images(args.images)
        batches = iter_batches(paths, loaded.preprocess, args.batch_size, args.skip_bad_images)
        total = len(paths)
    else:
        scenes = make_scenes(8, seed=0)
        ims = torch.stack([loaded.preprocess(Image.fromarray(im)) for im in scenes.images])
        batches = iter([([f"scene{i}" for i in range(len(ims))], ims)])
        total = len(ims)
    norms, errors, labels, count = None, [], None, 0
    with tqdm(total=total, unit="img", desc="decompose") as bar:
        for ids, x in batches:
            d = decompose(
                loaded, x, tokens=args.tokens, start_layer=args.start_layer, representation=args.representation
            )
            n = d.contributions.norm(dim=-1).sum(0)
            norms = n if norms is None else norms + n
            errors.append(d.error)
            labels = d
            count += len(ids)
            bar.update(len(ids))
    err = torch.cat(errors)
    print(f"{loaded.name} ({loaded.weights_id}) on {count} images")
    print(
        labels.summary().replace(
            labels.summary().splitlines()[-1 - len(labels.tokens)],
            f"completeness: max relative error {err.max().item():.2e} (mean {err.mean().item():.2e})",
        )
    )
    order = torch.argsort(norms, descending=True)[: args.top]
    print(f"largest components (mean L2 norm over {count} images):")
    for i in order.tolist():
        print(f"  {labels.names[i]:24s} {norms[i].item() / count:10.4f}")
    return 0


def _add_analyze_parser(sub) -> None:
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
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    cfg = AnalysisConfig.from_args(args)
    threads = args.threads or (1 if cfg.model.startswith("zoo:") else None)
    if threads:
        torch.set_num_threads(threads)
    run_analysis(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitdecomp",
        description="Decompose vision transformers' image representations into their parts and read them with text.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_decompose_parser(sub)
    _add_analyze_parser(sub)
    add_world_parser(sub)
    add_zoo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VitDecompError as err:
        print(f"vitdecomp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitdecomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
