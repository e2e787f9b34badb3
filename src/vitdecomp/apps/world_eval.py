"""The applications measured on the built-in world's ground truth (object masks, attributes), on a seed
no analysis, aligner or zoo training used: ``python -m vitdecomp.apps.world_eval heatmaps|retrieval
--analysis DIR [--n 200] [--seed 7100] [--json FILE]``.

Heatmaps: for each image, the texts of its true colour and shape ("a <colour> object", "a <shape>")
and of its background; per text, the map of the top heads (the heatmap command's rule), of all heads,
and of random heads (as many as the top ones, 5 draws): the share of positive relevance inside the
object mask, the pointing game (argmax inside the mask); for the background, both outside the mask.
The pointing game is reported on the signed map (argmax) and on its magnitude (argmax of ``|map|``):
a head may write a feature with either sign.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from vitdecomp.apps.analysis import Analysis, auto_heads, load_analysis
from vitdecomp.apps.retrieval_eval import evaluate_world
from vitdecomp.apps.token_maps import token_maps
from vitdecomp.world import make_scenes

#: The features a heatmap is measured on: the text of each value, and whether it belongs inside the object.
MAP_FEATURES = {"color": ("a {} object", True), "shape": ("a {}", True), "background": ("on {}", False)}
EVAL_SEED = 7100
N_RANDOM = 5


def feature_directions(analysis: Analysis) -> tuple[torch.Tensor, dict[str, slice]]:
    """The text embeddings of every value of :data:`MAP_FEATURES` ``[sum V_f, d_clip]`` and each
    feature's rows."""
    rows, where, s = [], {}, 0
    for f, (text, _) in MAP_FEATURES.items():
        emb = analysis.embed([text.format(v) for v in analysis.result.features[f]])
        rows.append(emb)
        where[f] = slice(s, s + len(emb))
        s += len(emb)
    return torch.cat(rows), where


def _map_scores(m: torch.Tensor, mask: torch.Tensor, inside: bool) -> tuple[float, float, float]:
    """(positive share in the target region, argmax in it, argmax of ``|m|`` in it) for a map ``[H, W]``."""
    region = (mask if inside else ~mask).flatten()
    flat = m.flatten()
    pos = flat.clamp_min(0)
    share = float((pos * region).sum() / pos.sum().clamp_min(1e-30))
    return share, float(region[flat.argmax()]), float(region[flat.abs().argmax()])


def heatmap_scores(analysis: Analysis, n: int = 200, seed: int = EVAL_SEED, batch: int = 25) -> dict:
    """Pointing game and positive share per feature and head set (top / all / random)."""
    scenes = make_scenes(n, seed=seed)
    masks = torch.from_numpy(scenes.masks)
    subject, labels = analysis.subject, analysis.result.labels
    dirs, where = feature_directions(analysis)
    heads_all = [lab for lab in labels if auto_heads({lab: 0.0}, [lab])]
    top = {f: auto_heads(analysis.scores(f), labels) for f in MAP_FEATURES}
    rng = random.Random(0)
    rand = {f: [rng.sample(heads_all, len(top[f])) for _ in range(N_RANDOM)] for f in MAP_FEATURES}
    acc: dict = {f: {k: [[], [], []] for k in ("top", "all", "random")} for f in MAP_FEATURES}
    for s in range(0, n, batch):
        idx = range(s, min(s + batch, n))
        x = torch.stack([subject.preprocess(scenes.pil(i)) for i in idx])
        maps = token_maps(subject, x, dirs, aligner=analysis.aligner, start_layer=analysis.result.start_layer or 0)
        for f, (_, inside) in MAP_FEATURES.items():
            truth = scenes.labels(f)
            per_set = {"top": [maps.pixels(top[f])], "all": [maps.pixels(heads_all)]}
            per_set["random"] = [maps.pixels(r) for r in rand[f]]
            for name, pxs in per_set.items():
                for px in pxs:
                    for j, i in enumerate(idx):
                        m = px[j, where[f].start + int(truth[i])]
                        for slot, value in zip(acc[f][name], _map_scores(m, masks[i], inside), strict=True):
                            slot.append(value)
    out = {
        f: {
            k: dict(zip(("share", "pointing", "pointing_abs"), map(np.mean, v), strict=True)) for k, v in acc[f].items()
        }
        for f in MAP_FEATURES
    }
    mask_share = float(scenes.masks.mean())
    return {
        "model": analysis.result.model.name,
        "n": n,
        "seed": seed,
        "mask_share": mask_share,
        "top_heads": top,
        "scores": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitdecomp.apps.world_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["heatmaps", "retrieval"])
    p.add_argument("--analysis", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    analysis = load_analysis(args.analysis)
    if args.what == "heatmaps":
        res = heatmap_scores(analysis, args.n, args.seed)
    else:
        res = evaluate_world(analysis, args.n, args.seed)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
