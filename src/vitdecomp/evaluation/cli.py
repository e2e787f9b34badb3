"""``vitdecomp validate``: every score against every ground truth on held-out world scenes, for the
zoo's models and their random-init control; writes docs/validation.md (keeping its ``## Notes``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from vitdecomp.evaluation.settings import HELD_OUT_SEED, MODELS, N_TEST, N_TRAIN, SCORES

_NOTES = "\n## Notes"


def add_validate_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check every component score against causal, probe and planted ground truths (docs/validation.md)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--clip", default="zoo:clip", help="the CLIP that reads the components")
    p.add_argument("--scores", nargs="+", default=list(SCORES), help="score methods (see vitdecomp.scores)")
    p.add_argument("--test-seed", type=int, default=HELD_OUT_SEED, help="world seed of the held-out scenes")
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--align-steps", type=int, default=3000, help="CompAlign training steps (when not cached)")
    p.add_argument(
        "--control",
        action="store_true",
        help="also run every model with random weights (the CLIP reader keeps its own) and compare its scores with "
        "the trained model's causal truth",
    )
    p.add_argument("--out", type=Path, default=Path("docs/validation.md"))
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest for the zoo)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    import torch

    from vitdecomp.evaluation.document import markdown
    from vitdecomp.evaluation.validate import control_agreement, control_null, validate_model
    from vitdecomp.fsio import atomic_write_text
    from vitdecomp.zoo.cards import planted_map

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for random_init in [False, True] if args.control else [False]:
        for name in args.models:
            r = validate_model(
                name,
                args.clip,
                scores=tuple(args.scores),
                test_seed=args.test_seed,
                n_train=args.n_train,
                n_test=args.n_test,
                random_init=random_init,
                planted=None if random_init else planted_map(name),
                cache_dir=args.cache_dir,
                align_steps=args.align_steps,
                device=args.device,
                progress=not args.quiet,
            )
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file() and _NOTES in args.out.read_text():
        text = text.rstrip("\n") + "\n" + _NOTES + args.out.read_text().split(_NOTES, 1)[1]
    atomic_write_text(args.out, text)
    if args.json:
        saved = {"results": runs[False], "control": runs[True]}
        atomic_write_text(args.json, json.dumps(saved, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0
