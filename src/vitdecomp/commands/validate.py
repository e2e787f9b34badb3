"""``vitdecomp validate``: every score against every ground truth on held-out world scenes, for the
zoo's models and their random-init control (:mod:`vitdecomp.evaluation.score_validation`); writes the
page ``validation.md`` into ``--out`` (a folder; keeping a ``## Notes`` section already there). It never
writes into the current folder's ``docs/`` unless asked: ``--out docs`` updates the project's page."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from vitdecomp.commands.options import Option, add_options, add_shared, apply_threads
from vitdecomp.defaults import VALIDATE_OUT
from vitdecomp.evaluation.settings import HELD_OUT_SEED, MODELS, N_PAIRS, N_TEST, N_TRAIN
from vitdecomp.scores.registry import score_names

DESCRIPTION = (
    "Every score against every ground truth (the counterfactual flow share and response, causal, probe, "
    "zero-shot causal, specificity, planted heads) on held-out scenes of the built-in world, for the zoo's models "
    "and, with --control, their random-weight twins; writes the page validation.md into --out (keeping a "
    "hand-written Notes section already there); --out docs updates a checkout's docs/validation.md."
)
_NOTES = "\n## Notes"


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--models", nargs="+", default=list(MODELS), help="the models validated (default: the zoo's)")
    names = score_names()  # the registry's scores, read when the parser is built
    p.add_argument(
        "--scores", nargs="+", default=list(names), choices=names, metavar="SCORE", help="the scores compared"
    )
    add_options(
        p,
        Option("test_seed", "world seed of the held-out scenes", HELD_OUT_SEED, int, metavar="N"),
        Option("n_test", "held-out scenes", N_TEST, int, metavar="N"),
        Option("n_train", "scenes the aligner and the truths' probes are fitted on", N_TRAIN, int, metavar="N"),
        Option(
            "n_pairs",
            "counterfactual pairs per attribute (the flow truth; drawn from the world seed after --test-seed)",
            N_PAIRS,
            int,
            metavar="N",
        ),
        Option(
            "control",
            "also run every model with random weights (the CLIP reader keeps its own) and compare its scores with "
            "the trained model's causal truth",
            False,
            None,
        ),
        Option("json", "also write every figure to this JSON file", metavar="FILE"),
    )
    add_shared(p, "reader", "align_steps", "cache_dir", "device", "threads", "out", "quiet", out=VALIDATE_OUT)
    p.set_defaults(func=run_validate)


def page_path(out: str) -> Path:
    """The page ``--out`` names: ``OUT/validation.md`` (``OUT`` a folder), or ``OUT`` itself when it
    names a ``.md`` file."""
    return Path(out) if out.endswith(".md") else Path(out) / "validation.md"


def run_validate(args: argparse.Namespace) -> int:
    import torch

    from vitdecomp.evaluation.score_document import markdown
    from vitdecomp.evaluation.score_validation import ScoreRun, control_agreement, control_null, validate_model
    from vitdecomp.fsio import atomic_write_text
    from vitdecomp.zoo.cards import planted_map

    apply_threads(args.threads, "zoo:" if all(m.startswith("zoo:") for m in args.models) else "")
    t0 = time.time()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for random_init in [False, True] if args.control else [False]:
        for name in args.models:
            run = ScoreRun(
                name=name,
                reader=args.reader,
                scores=tuple(args.scores),
                test_seed=args.test_seed,
                n_train=args.n_train,
                n_test=args.n_test,
                n_pairs=args.n_pairs,
                random_init=random_init,
                planted=None if random_init else planted_map(name),
                cache_dir=args.cache_dir,
                align_steps=args.align_steps,
                device=args.device or "cpu",
                progress=not args.quiet,
            )
            r = validate_model(run)
            if not random_init and planted_map(name):
                r["planted_map"] = planted_map(name)
            means = {m: round(sum(v["causal_mean"].values()) / 4, 3) for m, v in r["agreement"].items()}
            if random_init:
                trained = next(t for t in runs[False] if t["model"] == name)
                r["control_agreement"] = control_agreement(r, trained)
                r["control_null"] = control_null(r, trained)
                means = {m: round(sum(v.values()) / 4, 3) for m, v in r["control_agreement"].items()}
            runs[random_init].append(r)
            what = " (random init) vs the trained model's causal truth" if random_init else " vs its causal truth"
            print(f"{name}{what}: Spearman {means}", flush=True)
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    meta["time_s"] = time.time() - t0
    command = "vitdecomp validate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["validate"] else [])
    text = markdown(runs[False], runs[True], command.strip(), meta)
    out = page_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and _NOTES in out.read_text():
        text = text.rstrip("\n") + "\n" + _NOTES + out.read_text().split(_NOTES, 1)[1]
    atomic_write_text(out, text)
    if args.json:
        saved = {"results": runs[False], "control": runs[True]}
        atomic_write_text(args.json, json.dumps(saved, indent=1, default=float))
    print(f"wrote {out}")
    return 0
