"""World figures of ``vitdecomp debias`` and ``vitdecomp ablate`` for docs/applications.md.

Writes the Waterbirds-like split (1,400 images: 800 train / 200 val / 400 test) at each ``--corr``,
runs ``vitdecomp debias`` and ``vitdecomp ablate`` for each zoo model through the CLI (one thread),
and prints the Markdown tables::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/debias_ablate_world.py --out /tmp/debias \
        [--corr 1.0 0.99 0.95] [--models deit dino swin maxvit clip] [--skip-ablate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

VITDECOMP = [sys.executable, "-m", "vitdecomp"]


def run(args: list[str]) -> None:
    subprocess.run([*VITDECOMP, *args], check=True)


def debias_table(out: Path, corrs: list[str], models: list[str]) -> str:
    lines = [
        "| model | corr | score | k | worst group: head → ablated | average: head → ablated | random k (worst) | "
        "top-k by score(core) (worst) | projection (worst) | DFR (worst / avg) | gap to DFR closed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corr in corrs:
        for m in models:
            d = json.loads((out / f"debias-{m}-{corr}" / "debias.json").read_text())
            r = {x["name"].split(" ")[0] + ("-core" if "score(core)" in x["name"] else ""): x for x in d["readings"]}
            head, after = d["readings"][0]["test"], d["readings"][1]["test"]
            proj = next((x["test"]["worst"] for x in d["readings"] if x["name"].startswith("project")), None)
            gap = d["gap_closed"]
            lines.append(
                f"| zoo:{m} | {corr} | {d.get('score', 'ablation')} | {d['k']} | "
                f"{head['worst']:.3f} → **{after['worst']:.3f}** | "
                f"{head['average']:.3f} → {after['average']:.3f} | {r['ablate']['test']['worst']:.3f} | "
                f"{r['ablate-core']['test']['worst']:.3f} | {'–' if proj is None else f'{proj:.3f}'} | "
                f"{r['DFR:']['test']['worst']:.3f} / {r['DFR:']['test']['average']:.3f} | "
                f"{'–' if gap is None else f'{gap:.0%}'} |"
            )
    return "\n".join(lines)


def ablate_table(out: Path, models: list[str]) -> str:
    lines = [
        "| model | mean probe accuracy, 0 → all layers removed "
        "| feature: top-k / random-k probe accuracy (k = 1, 2, 4, 8) |",
        "|---|---|---|",
    ]
    for m in models:
        d = json.loads((out / f"ablate-{m}" / "ablate.json").read_text())
        curve = " → ".join(f"{np.mean(list(p['probe'].values())):.2f}" for p in d["layers"])
        for kind, name in (("model_head", "own head"), ("zero_shot", "zero-shot")):
            if d["layers"][0].get(kind):
                steps = " → ".join(f"{np.mean(list(p[kind].values())):.2f}" for p in d["layers"])
                curve += f" ({name}: {steps})"
        feats = "; ".join(
            f"{e['feature']} " + " ".join(f"{t:.2f}/{r:.2f}" for t, r in zip(e["top"], e["random_mean"], strict=True))
            for e in d["features"]
        )
        lines.append(f"| zoo:{m} | {curve} | {feats} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corr", nargs="+", default=["1.0", "0.99", "0.95"])
    p.add_argument("--models", nargs="+", default=["deit", "simclr", "swin", "maxvit", "clip"])
    p.add_argument("--skip-ablate", action="store_true")
    p.add_argument("--tables-only", action="store_true")
    a = p.parse_args()
    cache = a.out / "cache"
    if not a.tables_only:
        for corr in a.corr:
            wb = a.out / f"wb{corr}"
            if not (wb / "metadata.csv").exists():
                run(
                    [
                        "world",
                        "export",
                        "--waterbirds",
                        "--n-images",
                        "1400",
                        "--seed",
                        "0",
                        "--corr",
                        corr,
                        "--out",
                        str(wb),
                        "--quiet",
                    ]
                )
            for m in a.models:
                run(
                    [
                        "debias",
                        "--images",
                        str(wb),
                        "--model",
                        f"zoo:{m}",
                        "--out",
                        str(a.out / f"debias-{m}-{corr}"),
                        "--cache-dir",
                        str(cache),
                        "--quiet",
                    ]
                )
        if not a.skip_ablate:
            for m in a.models:
                run(
                    [
                        "ablate",
                        "--model",
                        f"zoo:{m}",
                        "--out",
                        str(a.out / f"ablate-{m}"),
                        "--cache-dir",
                        str(cache),
                        "--quiet",
                    ]
                )
    print(debias_table(a.out, a.corr, a.models))
    if not a.skip_ablate:
        print()
        print(ablate_table(a.out, a.models))


if __name__ == "__main__":
    main()
