"""``python -m vitdecomp.commands.validate_alignment``: the first validation (alignment, probe truth,
retrieval, the CompAlign ablation) on the built-in world (:mod:`vitdecomp.evaluation.alignment`);
writes docs/validation-alignment.md (a ``## Notes`` section already there is carried over). Tooling,
not a subcommand of ``vitdecomp``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vitdecomp.commands.options import Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import DEFAULT_N_IMAGES, MODEL

_NOTES = "\n## Notes"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitdecomp.commands.validate_alignment",
        description="The first validation of the alignment, the scores and retrieval on the built-in world.",
    )
    p.add_argument("--models", nargs="+", default=None, help="the models validated (default: the zoo's four)")
    p.add_argument("--ablation", nargs="*", default=[MODEL], help="models to run the CompAlign ablation on")
    add_options(
        p,
        Option("json", "also write every figure to this JSON file", metavar="FILE"),
        Option("control", "also run the same models (and CLIP) with random weights, as a control", False, None),
        Option("n_train", "scenes the aligner and the probes are fitted on", DEFAULT_N_IMAGES, int, metavar="N"),
        Option("n_test", "held-out scenes", 1000, int, metavar="N"),
    )
    add_shared(
        p,
        "reader",
        "random_init",
        "align_steps",
        "cache_dir",
        "device",
        "threads",
        "out",
        "quiet",
        out="docs/validation-alignment.md",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from vitdecomp.evaluation.alignment import MODELS, AlignmentRun, markdown, summary_line, validate_alignment

    models = args.models or list(MODELS)
    apply_threads(args.threads, "zoo:" if all(m.startswith("zoo:") for m in models) else "")
    t0 = time.time()
    runs = [False, True] if args.control and not args.random_init else [args.random_init]
    by_run: dict[bool, list[dict]] = {}
    for random_init in runs:
        by_run[random_init] = []
        for name in models:
            run = AlignmentRun(
                name=name,
                reader=args.reader,
                cache_dir=args.cache_dir,
                n_train=args.n_train,
                n_test=args.n_test,
                random_init=random_init,
                ablation=name in args.ablation and not (random_init and args.control),
                align_steps=args.align_steps,
                device=args.device or "cpu",
                progress=not args.quiet,
            )
            r = validate_alignment(run)
            by_run[random_init].append(r)
            print(summary_line(r, random_init), flush=True)
    results = by_run[runs[0]]
    control = by_run.get(True) if args.control and not args.random_init else None
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    meta |= {"threads": torch.get_num_threads(), "time_s": time.time() - t0}
    text = markdown(results, list(argv if argv is not None else sys.argv[1:]), meta, control)
    _write(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "control": control}, indent=1, default=float))
    print(text)
    return 0


def _write(out: Path, text: str) -> None:
    """Write ``text`` to ``out``, keeping the hand-written ``## Notes`` section of the previous version."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and _NOTES in out.read_text():
        text = text.rstrip("\n") + "\n" + _NOTES + out.read_text().split(_NOTES, 1)[1]
    out.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
