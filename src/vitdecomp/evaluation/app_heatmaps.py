"""The applications measured on the built-in world's ground truth (object masks, attributes), on a seed
no analysis, aligner or zoo training used: ``python -m vitdecomp.commands.evaluate_apps
heatmaps|retrieval --report DIR [--n-images 200] [--seed 7100] [--json FILE]`` (``rules``: the study
behind the heatmap command's choice of heads and direction, :func:`heatmap_rules`; retrieval:
:mod:`vitdecomp.evaluation.app_retrieval`).

Heatmaps: for each image, the texts of its true colour and shape ("a <colour> object", "a <shape>")
and of its background, read as ``vitdecomp heatmap`` reads a feature's value (the text minus the mean
of the feature's other values' texts); per text, the map of the top heads (the heatmap command's rule), of all heads,
and of random heads (as many as the top ones, 5 draws): the share of positive relevance inside the
object mask, the pointing game (argmax inside the mask); for the background, both outside the mask.
The pointing game is reported on the signed map (argmax) and on its magnitude (argmax of ``|map|``):
a head may write a feature with either sign.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import torch

from vitdecomp.apps.analysis import Analysis, auto_heads
from vitdecomp.apps.heatmap import contrastive
from vitdecomp.apps.token_maps import token_maps
from vitdecomp.world import make_scenes

#: The features a heatmap is measured on: the text of each value, and whether it belongs inside the object.
MAP_FEATURES = {"color": ("a {} object", True), "shape": ("a {}", True), "background": ("on {}", False)}
EVAL_SEED = 7100
N_RANDOM = 5


def phrase(template: str, value: str) -> str:
    """``template`` filled with ``value``, "a" before a vowel sound made "an" ("an orange object")."""
    return re.sub(r"\ba (?=[aeiouAEIOU])", "an ", template.format(value))


def feature_directions(analysis: Analysis) -> tuple[torch.Tensor, dict[str, slice]]:
    """The directions the maps read for every value of :data:`MAP_FEATURES` ``[sum V_f, d_clip]`` (the
    value's text minus the mean of the feature's other values' texts, as ``vitdecomp heatmap`` reads a
    feature's value) and each feature's rows."""
    rows, where, s = [], {}, 0
    for f, (text, _) in MAP_FEATURES.items():
        emb = analysis.embed([phrase(text, v) for v in analysis.result.features[f]])
        rows.append(contrastive(emb, emb))
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


#: The head counts the rule study compares, in multiples of ``ceil(sqrt(H))`` (``None``: every head).
RULE_HEADS = {"sqrt": 1, "2sqrt": 2, "all": None}


def heatmap_rules(analysis: Analysis, n: int = 100, seed: int = EVAL_SEED, batch: int = 25) -> dict:
    """Signed pointing game (hit: argmax in the target region) of every rule ``heads x direction``:
    the top ``m ceil(sqrt(H))`` heads by score (:data:`RULE_HEADS`), each along the value's text
    (``"text"``) or the text minus the mean of the feature's other values' texts (``"contrastive"``)."""
    scenes = make_scenes(n, seed=seed)
    masks = torch.from_numpy(scenes.masks)
    labels = analysis.result.labels
    heads_all = [lab for lab in labels if auto_heads({lab: 0.0}, [lab])]
    root = math.ceil(math.sqrt(len(heads_all)))
    texts, where, s0 = [], {}, 0
    for f, (template, _) in MAP_FEATURES.items():
        texts.append(analysis.embed([phrase(template, v) for v in analysis.result.features[f]]))
        where[f], s0 = slice(s0, s0 + len(texts[-1])), s0 + len(texts[-1])
    dirs = torch.cat(texts)
    ranked = {f: sorted(heads_all, key=lambda h, f=f: -analysis.scores(f)[h]) for f in MAP_FEATURES}
    hits: dict[str, list[float]] = {}
    for s in range(0, n, batch):
        idx = range(s, min(s + batch, n))
        x = torch.stack([analysis.subject.preprocess(scenes.pil(i)) for i in idx])
        maps = token_maps(
            analysis.subject, x, dirs, aligner=analysis.aligner, start_layer=analysis.result.start_layer or 0
        )
        for f, (_, inside) in MAP_FEATURES.items():
            truth, sl = scenes.labels(f), where[f]
            for rule, m in RULE_HEADS.items():
                text = maps.pixels(ranked[f] if m is None else ranked[f][: m * root])[:, sl]  # [B, V, H, W]
                v = text.shape[1]
                contrast = text - (text.sum(1, keepdim=True) - text) / (v - 1)
                for how, px in (("text", text), ("contrastive", contrast)):
                    for j, i in enumerate(idx):
                        got = _map_scores(px[j, int(truth[i])], masks[i], inside)[1]
                        hits.setdefault(f"{f} {rule} {how}", []).append(got)
    pointing = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"model": analysis.result.model.name, "n": n, "seed": seed, "heads": len(heads_all), "pointing": pointing}
