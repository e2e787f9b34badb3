"""``vitdecomp retrieve``: search an analysed image set by text or by example
(:class:`vitdecomp.apps.retrieval.Retrieve`); writes ``ranking.json`` and ``gallery.html``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitdecomp.commands._apps import analysed, analysed_model
from vitdecomp.commands.options import OUTPUT, RUN, Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import ANALYSIS_DIR, N_RESULTS, RETRIEVE_OUT

DESCRIPTION = (
    "By text: images ranked by the cosine between the text and the aligned sum of a feature's top-k components "
    "(or the whole representation). By example: images whose feature's components read as the same value as "
    "the reference's. Writes ranking.json (image ids best first, scores, the components used) and gallery.html."
)
SHARED = ("checkpoint", *RUN, "report", *OUTPUT)
OWN = (
    Option("feature", "read only this feature's top components (required with --image)"),
    Option("k", "number of components (default: 2 ceil(sqrt(C)))", None, int, metavar="K"),
    Option("n_results", "images to return", N_RESULTS, int, metavar="N", aliases=("--n",)),
)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='a description, e.g. "a red object"')
    what.add_argument("--image", help="a reference image (a path, or an id of the analysed set)")
    add_options(p, *OWN)
    add_shared(p, *SHARED, device="cpu", report=ANALYSIS_DIR, out=RETRIEVE_OUT)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.apps.retrieval import Retrieve, RetrieveConfig, ranked_images
    from vitdecomp.fsio import atomic_write_text
    from vitdecomp.report.gallery import gallery_page
    from vitdecomp.report.outputs import write_app_outputs

    cfg = RetrieveConfig(
        text=args.text,
        image=args.image,
        feature=args.feature,
        k=args.k,
        n_results=args.n_results,
        analysis=args.report,
        checkpoint=args.checkpoint,
        device=args.device,
        out=args.out,
    )
    apply_threads(args.threads, analysed_model(args.report))
    result = Retrieve().run(cfg)
    ranking = write_app_outputs(result, cfg.out, section=False)[0]
    images = ranked_images(result, _root_of(args.report))
    page = atomic_write_text(Path(cfg.out) / "gallery.html", gallery_page(result.query, result.ranking, images))
    print(ranking if args.quiet else f"{len(result.ranking)} images in {ranking}, {page}")
    return 0


def _root_of(folder: str) -> str:
    """The folder the analysed image ids are relative to (``""``: generated scenes)."""
    images = analysed(folder).get("images")
    return str(images.get("root", "")) if isinstance(images, dict) else ""
