"""Features the images do not show: world scenes (coloured shapes) analysed with the general feature set.

    python benchmarks/absent_features.py [--models zoo:deit zoo:simclr] [--seed 6003] [--n 1000]

For each model, ``vitdecomp analyze`` on ``--n`` scenes of world ``--seed`` with ``--features paper world``
(the paper's features, the world's colour / shape / pattern / background in place of the paper's colour,
shape and pattern), then per feature: the presence test (R^2 of the reader's image embeddings between the
feature's zero-shot labels, the largest of the null's 99 groups of real texts, p) and, per score, the
components marked significant (``significant``: above the null of real texts *and* the feature present),
beside those above that null alone (``p <= 0.05``, the feature's presence set aside) and the flow score's
components above the old null (random rotations of the descriptions, no presence test) for the flow score
and for the previous default, text_probe. Prints one Markdown table per model. One thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vitdecomp.analyze import AnalysisConfig, run_analysis
from vitdecomp.pipeline.fill import readable_rows
from vitdecomp.scores import Resampling, embed_features, load_features, score_confidence
from vitdecomp.store import reopen_store

SCORES = ("flow", "text_probe", "ablation", "invariant", "paper")


#: The scores whose components above the old null (random rotations) are counted.
OLD_NULL = ("flow", "text_probe")


def rotation_null_counts(data: dict, feature_emb: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per score of :data:`OLD_NULL` and feature, the components above the old null (random rotations of
    the descriptions, no presence test)."""
    from vitdecomp.align import load_aligner

    rows = readable_rows(reopen_store(data["store"]["path"]))
    aligner = load_aligner(data["aligner"]["path"], labels=data["labels"])
    conf = score_confidence(rows, aligner, feature_emb, OLD_NULL, Resampling(0, 19), progress=False)
    return {m: dict(zip(c.features, (c.p_value <= 0.05 + 1e-9).sum(1).tolist(), strict=True)) for m, c in conf.items()}


def study(model: str, seed: int, n: int, out: Path) -> list[str]:
    """The table of one model (see the module text)."""
    cfg = AnalysisConfig(
        model=model, n_images=n, seed=seed, features=["paper", "world"], progress=False, verbose=False, out=out
    )
    run_analysis(cfg)
    data = json.loads((out / "results.json").read_text())
    from vitdecomp.pipeline.model_pair import load_model_for
    from vitdecomp.text import WORLD_TEMPLATES, TextEncoder

    encoder = TextEncoder.from_loaded(load_model_for(data["clip"]["name"]), cache_dir=cfg.cache_path / "text")
    emb = embed_features(lambda t: encoder.encode(t, WORLD_TEMPLATES), load_features(["paper", "world"]))
    old = rotation_null_counts(data, emb)
    cols = " | ".join(f"`{m}` significant (above null)" for m in SCORES)
    rot = " | ".join(f"`{m}` above the rotation null" for m in OLD_NULL)
    head = f"| feature | present (R², null's largest, p) | {cols} | {rot} |"
    lines = [head, "|---|---|" + "---|" * (len(SCORES) + len(OLD_NULL))]
    for f, pres in data["presence"]["features"].items():
        cells = []
        for m in SCORES:
            row = data["confidence"][m]["scores"][f].values()
            cells.append(f"{sum(c['significant'] for c in row)} ({sum(c['p'] <= 0.05 + 1e-9 for c in row)})")
        verdict = "yes" if pres["present"] else "**no**"
        lines.append(
            f"| {f} | {verdict} ({pres['r2']:.3f}, {pres['null_high']:.3f}, {pres['p']:.2f}) | "
            + " | ".join(cells)
            + "".join(f" | {old[m][f]}" for m in OLD_NULL)
            + " |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["zoo:deit", "zoo:simclr"])
    p.add_argument("--seed", type=int, default=6003)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            print(f"\n{model}, {args.n} scenes of world seed {args.seed}, --features paper world\n")
            print("\n".join(study(model, args.seed, args.n, Path(tmp) / model.replace(":", "_"))))


if __name__ == "__main__":
    main()
