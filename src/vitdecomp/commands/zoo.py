"""``vitdecomp zoo list``, ``vitdecomp zoo train [NAME ...]`` and ``vitdecomp zoo evaluate [NAME ...]``:
the shipped models' cards, training them again (:mod:`vitdecomp.zoo.train`) and measuring them
(:mod:`vitdecomp.zoo.evaluate`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from vitdecomp.commands.options import Option, add_options, add_shared
from vitdecomp.errors import VitDecompError

#: Training order: ``swin`` and ``clip`` distil from ``deit``, so ``deit`` comes first; with
#: ``--jobs 2`` the longest trainings start first (deit beside maxvit, then swin, clip, simclr, planted).
TRAIN_ORDER = ("deit", "maxvit", "swin", "clip", "simclr", "planted")


def configure(p: argparse.ArgumentParser) -> None:
    p.description = "The zoo: small models trained on the built-in world."
    sub = p.add_subparsers(dest="zoo_command", required=True)
    ls = sub.add_parser("list", help="print the zoo models with their cards' headline numbers")
    ls.add_argument("--json", action="store_true", help="print the full cards as JSON")
    ls.set_defaults(func=run_list)
    tr = sub.add_parser(
        "train",
        help="retrain zoo models from scratch (reproducible) into a user folder (--out)",
        description="Retrain zoo models from scratch. They are written as weights/ and cards/ under --out (default: "
        "$VITDECOMP_ZOO_DIR, else $XDG_DATA_HOME/vitdecomp/zoo or ~/.local/share/vitdecomp/zoo; load them with "
        "--checkpoint), or into the installed package with --replace-shipped.",
    )
    tr.add_argument("names", nargs="*", help=f"models to train (default: all, in the order {' '.join(TRAIN_ORDER)})")
    add_options(
        tr,
        Option("no_eval", "skip the held-out measurements", False, None),
        # training's own thread count (tooling, not the analysis commands' rule): torch's choice, 1 per job with --jobs
        Option(
            "training_threads",
            "torch CPU threads per training (default: torch's, 1 with --jobs)",
            None,
            int,
            flag="--threads",
            metavar="N",
        ),
    )
    add_shared(tr, "out", "quiet")
    tr.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings run side by side as subprocesses, one thread each unless --threads (a teacher finishes "
        "before its students start); on a 2-core machine --jobs 2 roughly halves the wall time",
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="skip models whose card and weights already match the current recipe, config and teacher",
    )
    tr.add_argument(
        "--replace-shipped",
        action="store_true",
        help="write into the installed package instead, replacing the shipped weights and cards",
    )
    tr.set_defaults(func=run_train)
    ev = sub.add_parser("evaluate", help="measure zoo models on held-out scenes and print the table of docs/zoo.md")
    ev.add_argument("names", nargs="*", help="models to measure (default: all)")
    ev.add_argument("--write-cards", action="store_true", help="store the numbers in the cards")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write all metrics to this JSON file")
    ev.add_argument("--from-cards", action="store_true", help="print the table of the cards' stored numbers")
    ev.set_defaults(func=run_evaluate)


def user_zoo_dir() -> Path:
    """Where ``zoo train`` writes by default: ``$VITDECOMP_ZOO_DIR``, else ``$XDG_DATA_HOME/vitdecomp/zoo``,
    else ``~/.local/share/vitdecomp/zoo`` (never the installed package, unless ``--replace-shipped``)."""
    env = os.environ.get("VITDECOMP_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "vitdecomp" / "zoo"


def run_list(args: argparse.Namespace) -> int:
    from vitdecomp.zoo.cards import list_zoo

    cards = list_zoo()
    if args.json:
        print(json.dumps(cards, indent=1))
        return 0
    for c in cards:
        m = c.get("metrics", {})
        parts = [f"zoo:{c['name']:<7}", c.get("family", c.get("config", {}).get("family", ""))]
        if "params" in c:
            parts.append(f"{c['params'] / 1e6:.2f}M params")
        if m.get("probe"):
            parts.append("probe " + " ".join(f"{k}={100 * v:.1f}" for k, v in m["probe"].items()))
        if "task_min" in m:
            parts.append(f"task(min)={100 * m['task_min']:.1f}")
        if "zero_shot_min" in m:
            parts.append(f"zero-shot(min)={100 * m['zero_shot_min']:.1f} R@1={100 * m['r1_image_to_caption']:.1f}")
        if not c.get("weights_present"):
            parts.append("(weights missing: vitdecomp zoo train " + c["name"] + ")")
        print("  ".join(parts))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from vitdecomp.zoo.freshness import is_up_to_date
    from vitdecomp.zoo.models import ZOO_NAMES

    names = args.names or list(TRAIN_ORDER)
    unknown = [n for n in names if n not in ZOO_NAMES]
    if unknown:
        raise VitDecompError(f"unknown zoo model(s) {unknown}; choose from {list(ZOO_NAMES)}")
    names = [n for n in TRAIN_ORDER if n in names]
    if args.replace_shipped and args.out:
        raise VitDecompError("give either --out or --replace-shipped, not both")
    out = None if args.replace_shipped else Path(args.out) if args.out else user_zoo_dir()
    if out is not None:
        print(f"zoo: writing weights and cards under {out} (the shipped ones stay; --replace-shipped replaces them)")
    weights_dir = out / "weights" if out else None
    cards_dir = out / "cards" if out else None
    if args.resume:
        done = [n for n in names if is_up_to_date(n, weights_dir, cards_dir)]
        for n in done:
            print(f"zoo:{n} is up to date (card and weights match the recipe, config and teacher); skipped")
        names = [n for n in names if n not in done]
    if args.jobs > 1:
        return _train_parallel(names, args, out)
    import torch

    if args.training_threads:
        torch.set_num_threads(args.training_threads)
    for name in names:
        card = train_and_save(
            name, progress=not args.quiet, evaluate=not args.no_eval, weights_dir=weights_dir, cards_dir=cards_dir
        )
        print(f"zoo:{name} trained in {card['training']['train_time_s'] / 60:.1f} min")
    return 0


def train_and_save(name: str, **kwargs):
    """:func:`vitdecomp.zoo.train.train_and_save`, imported on first use (so ``--help`` needs no torch)."""
    from vitdecomp.zoo.train import train_and_save as train_one

    return train_one(name, **kwargs)


def _train_command(name: str, args: argparse.Namespace, out) -> list[str]:
    cmd = [sys.executable, "-m", "vitdecomp", "zoo", "train", name, "--threads", str(args.training_threads or 1)]
    return cmd + ["--no-eval"] * args.no_eval + (["--out", str(out)] if out else ["--replace-shipped"])


def _train_parallel(names: list[str], args: argparse.Namespace, out, command=_train_command, poll: float = 2.0) -> int:
    """Run the trainings as ``args.jobs`` side-by-side subprocesses (each logging to
    ``<out or .>/zoo-logs/NAME.log``); a model starts once the model it distils from has finished."""
    from tqdm import tqdm

    from vitdecomp.zoo.recipes import RECIPES

    log_dir = Path(out or ".") / "zoo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(names), {}, []
    t0 = time.time()
    bar = tqdm(total=len(names), desc="zoo", unit="model")
    while pending or running:
        for name in list(pending):
            if len(running) >= args.jobs:
                break
            teacher = RECIPES[name].distill_from
            if teacher in failed:
                pending.remove(name)
                failed.append(name)
                bar.write(f"zoo:{name} not trained: its teacher {teacher} failed")
                continue
            if teacher in pending or teacher in running:
                continue
            cmd = command(name, args, out)
            log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            pending.remove(name)
            bar.write(f"zoo:{name} started (log: {log_dir / f'{name}.log'})")
        time.sleep(poll)
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            bar.update(1)
            minutes = (time.time() - started) / 60
            if proc.returncode:
                failed.append(name)
                bar.write(f"zoo:{name} FAILED after {minutes:.1f} min (exit {proc.returncode}); see its log")
            else:
                bar.write(f"zoo:{name} trained in {minutes:.1f} min")
        bar.set_postfix_str(" | ".join(f"{n} {_last_progress(log_dir / f'{n}.log')}" for n in running))
    bar.close()
    print(f"zoo: {len(names) - len(failed)}/{len(names)} trained in {(time.time() - t0) / 60:.1f} min wall")
    return 1 if failed else 0


def _last_progress(path) -> str:
    """The newest tqdm state in a training log, e.g. ``epoch 2/6 45%``."""
    try:
        tail = path.read_bytes()[-400:].decode("utf-8", "replace")
    except OSError:
        return ""
    hits = re.findall(r"epoch (\d+/\d+):\s*(\d+%)", tail)
    return f"epoch {hits[-1][0]} {hits[-1][1]}" if hits else "starting"


def run_evaluate(args: argparse.Namespace) -> int:
    """``vitdecomp zoo evaluate``: :func:`vitdecomp.zoo.evaluate.evaluate_zoo` and its table."""
    from vitdecomp.zoo.cards import read_card
    from vitdecomp.zoo.evaluate import evaluate_zoo, table
    from vitdecomp.zoo.models import ZOO_NAMES

    args.names = args.names or list(ZOO_NAMES)
    if args.from_cards:
        print(table([read_card(n) or {"name": n} for n in args.names]))
        return 0
    cards, metrics = evaluate_zoo(list(args.names), write_cards=args.write_cards)
    print(table(cards))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
    return 0
