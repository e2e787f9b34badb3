"""``vitdecomp features``: sparse-autoencoder features of the analysed representation, named through
the aligner and located exactly in the parts (:class:`vitdecomp.apps.features.Features`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdecomp.commands._apps import analysed_model, run_application
from vitdecomp.commands.options import OUTPUT, RUN, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import ANALYSIS_DIR, FEATURES_OUT, FEATURES_SHOW, FEATURES_TOP, SAE_STEPS

DESCRIPTION = (
    "On an analysis (--report, the --out of `vitdecomp analyze`): train a TopK sparse autoencoder on its "
    "representations (streamed from its store, a tenth of the images held out) or read one (--sae: a vitdecomp, "
    "saev, ViT-Prisma or sae-lens file); name each latent through the aligner (its decoder direction in CLIP "
    "space read against the analysis' feature values and vocabulary, with a confidence), split its "
    "pre-activation exactly over the parts, and map it on its top images. Writes features.json, "
    "activations.npy [images x latents] (and sae.safetensors when trained) to --out, and adds a Features "
    "section to the analysis' report."
)
OWN = (
    Option("sae", "read this SAE instead of training one (.safetensors, a saev file, or a Prisma / sae-lens folder)"),
    Option(
        "latents",
        "latents of the SAE trained (default: twice the directions holding 99%% of the variance)",
        None,
        int,
        metavar="N",
    ),
    Option("k", "active latents per image, TopK (default: half those directions, 4 to 32)", None, int, metavar="K"),
    Option("steps", "training steps (Adam, 256 images a step)", SAE_STEPS, int, metavar="N"),
    Option(
        "show",
        "latents whose report panel shows their top images with maps (the most frequent)",
        FEATURES_SHOW,
        int,
        metavar="N",
    ),
    Option("top", "top images per panel", FEATURES_TOP, int, metavar="N"),
)
SHARED = ("checkpoint", *RUN, "seed", "report", *OUTPUT)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_options(p, *OWN)
    add_shared(p, *SHARED, device="cpu", seed=0, report=ANALYSIS_DIR, out=FEATURES_OUT)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.features import Features, FeaturesConfig
    from vitdecomp.errors import UsageError

    for flag in ("latents", "k", "steps", "show", "top"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "show" else 1):
            raise UsageError(f"--{flag} {getattr(args, flag)}: give a positive number")
    cfg = FeaturesConfig(
        analysis=args.report,
        sae=args.sae,
        latents=args.latents,
        k=args.k,
        steps=args.steps,
        seed=args.seed,
        show=args.show,
        top=args.top,
        checkpoint=args.checkpoint,
        device=args.device,
        out=args.out,
        progress=not args.quiet,
    )
    apply_threads(args.threads, analysed_model(args.report))
    return run_application(Features(), cfg, args, _describe)


def _describe(result: Any, paths: list[Path]) -> str:
    f, s = result.metrics, result.sae
    trained = f"trained in {s.train_seconds:.0f} s" if s.trained else f"read from {s.file}"
    lines = [
        f"SAE ({s.source}, {s.latents} latents, {s.activation}{f' k={s.k}' if s.k else ''}; {trained})",
        f"  explained variance {f.explained_variance:.3f} at mean L0 {f.l0:.1f} on {f.n_held_out} held-out images; "
        f"{f.dead} dead latents ({100 * f.dead_fraction:.1f} %); split completeness error max {f.max_split_error:.1e}",
    ]
    for kind, by in f.agreement.items():
        if by:
            lines.append(
                f"  {kind} reading kept on the reconstruction: " + ", ".join(f"{k} {v:.3f}" for k, v in by.items())
            )
    lines.append(f"{', '.join(p.name for p in paths)} in {paths[0].parent}")
    return "\n".join(lines)
