"""The applications measured on the built-in world's ground truth (object masks, attributes), on a seed
no analysis, aligner or zoo training used: ``python -m vitdecomp.commands.evaluate_apps
heatmaps|specificity|retrieval --report DIR [--n-images 200] [--seed 7100] [--json FILE]`` (``rules``:
the study behind the heatmap command's choice of heads, :func:`heatmap_rules`; the segmentation half
of ``specificity``: :mod:`vitdecomp.evaluation.app_specificity`; retrieval:
:mod:`vitdecomp.evaluation.app_retrieval`).

Heatmaps (:func:`heatmap_scores`): for each image and each feature of :data:`MAP_FEATURES`, the text of
its **right** value ("a <colour> object", "a <shape>", "on <background>") and of a **wrong** one (a
seeded draw among the other values), each mapped as ``vitdecomp heatmap`` maps it (the value-specific
map of :mod:`vitdecomp.apps.specific`, ``"specific"``) and as it was mapped before (the text minus the
mean of the feature's other values' texts, ``"mean_others"``); by the top heads (the command's rule),
all heads and random heads (as many as the top ones, 5 draws). Per map: the share of positive relevance
inside the target region (the object; for the background, outside it), the pointing game (argmax in
the region; a map with no positive value points nowhere, a miss) with ties broken at the first pixel
(``pointing``) or averaged over the tied pixels (``pointing_ties``: a token's box is one value, and its
first pixel decides a straddling box), for the object's features the pointing game with the classic
tolerance (``pointing_near``: the argmax within :data:`NEAR` pixels of the object — Zhang et al.'s 15
px at 224 px, scaled to the world's 64 px) and the segmentation scores of
:mod:`vitdecomp.apps.seg_metrics` (``miou``, ``iou_object``). A random direction in CLIP space
(``"random_direction"``) says how often any map points into the object: where every token
contribution is large.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from vitdecomp.apps.analysis import Analysis, auto_heads
from vitdecomp.apps.heatmap import whole_scores
from vitdecomp.apps.seg_metrics import SegAccumulator
from vitdecomp.apps.specific import reading, specific_maps
from vitdecomp.apps.token_maps import token_maps
from vitdecomp.world import make_scenes

#: The features a heatmap is measured on: the text of each value, and whether it belongs inside the object.
MAP_FEATURES = {"color": ("a {} object", True), "shape": ("a {}", True), "background": ("on {}", False)}
EVAL_SEED = 7100
#: The pointing game's tolerance in input pixels (``pointing_near``).
NEAR = 4
N_RANDOM = 5
#: The maps compared: the command's value-specific map, and the earlier text-minus-other-values' mean.
RULES = ("specific", "mean_others")


def phrase(template: str, value: str) -> str:
    """``template`` filled with ``value``, "a" before a vowel sound made "an" ("an orange object")."""
    return re.sub(r"\ba (?=[aeiouAEIOU])", "an ", template.format(value))


def feature_texts(analysis: Analysis) -> tuple[torch.Tensor, dict[str, slice]]:
    """The embeddings of every value's text of :data:`MAP_FEATURES` ``[sum V_f, d_clip]`` and each
    feature's rows."""
    rows, where, s = [], {}, 0
    for f, (text, _) in MAP_FEATURES.items():
        rows.append(analysis.embed([phrase(text, v) for v in analysis.result.features[f]]))
        where[f] = slice(s, s + len(rows[-1]))
        s += len(rows[-1])
    return torch.cat(rows), where


@dataclass
class MapScores:
    """Running scores of maps against a target region (see the module text)."""

    inside: bool
    share: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)
    ties: list[float] = field(default_factory=list)
    near: list[float] = field(default_factory=list)
    seg: SegAccumulator = field(default_factory=SegAccumulator)

    def add(self, m: torch.Tensor, mask: torch.Tensor) -> None:
        """One map ``[H, W]`` and its object mask ``[H, W]`` (bool)."""
        region = (mask if self.inside else ~mask).flatten()
        flat = m.flatten()
        pos = flat.clamp_min(0)
        self.share.append(float((pos * region).sum() / pos.sum().clamp_min(1e-30)))
        top = float(flat.max())
        self.pointing.append(float(region[flat.argmax()]) if top > 0 else 0.0)
        self.ties.append(float(region[flat == top].float().mean()) if top > 0 else 0.0)
        if self.inside:
            self.seg.add(m[None], mask[None])
            grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * NEAR + 1, 1, NEAR).flatten()
            self.near.append(float(grown[flat.argmax()]) if top > 0 else 0.0)

    def result(self) -> dict[str, float]:
        out = {"share": np.mean(self.share), "pointing": np.mean(self.pointing), "pointing_ties": np.mean(self.ties)}
        if self.inside:
            seg = self.seg.result()
            out |= {"miou": seg.miou, "iou_object": seg.iou_object, "pointing_near": np.mean(self.near)}
        return {k: float(v) for k, v in out.items()}


def _wrong(truth: np.ndarray, n_values: int, seed: int) -> np.ndarray:
    """Per image a value other than ``truth`` (seeded, uniform)."""
    return (truth + np.random.default_rng(seed).integers(1, n_values, size=len(truth))) % n_values


def _head_sets(analysis: Analysis) -> dict[str, dict[str, list[list[str]]]]:
    """Per feature: the top heads (the command's rule), all heads, :data:`N_RANDOM` random draws."""
    labels = analysis.result.labels
    heads_all = [lab for lab in labels if auto_heads({lab: 0.0}, [lab])]
    rng = random.Random(0)
    out = {}
    for f in MAP_FEATURES:
        top = auto_heads(analysis.scores(f), labels)
        out[f] = {
            "top": [top],
            "all": [heads_all],
            "random": [rng.sample(heads_all, len(top)) for _ in range(N_RANDOM)],
        }
    return out


def heatmap_scores(analysis: Analysis, n: int = 200, seed: int = EVAL_SEED, batch: int = 25) -> dict:
    """Right- and wrong-value maps of every rule and head set, scored (module text)."""
    scenes = make_scenes(n, seed=seed)
    masks = torch.from_numpy(scenes.masks)
    texts, where = feature_texts(analysis)
    g = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.normalize(torch.randn(2, texts.shape[1], generator=g), dim=-1)
    sets = _head_sets(analysis)
    truth = {f: scenes.labels(f) for f in MAP_FEATURES}
    wrong = {f: _wrong(truth[f], where[f].stop - where[f].start, seed) for f in MAP_FEATURES}
    acc: dict[tuple, MapScores] = {}
    for s in range(0, n, batch):
        idx = list(range(s, min(s + batch, n)))
        x = torch.stack([analysis.subject.preprocess(scenes.pil(i)) for i in idx])
        maps = token_maps(
            analysis.subject,
            x,
            torch.cat([texts, noise]),
            aligner=analysis.aligner,
            start_layer=analysis.result.start_layer or 0,
        )
        cos = whole_scores(maps, analysis, texts)
        for f, (_, inside) in MAP_FEATURES.items():
            sl = where[f]
            p = reading(cos[:, sl], analysis.logit_scale)
            for heads_name, draws in sets[f].items():
                for heads in draws:
                    px = maps.pixels(heads).float().cpu()
                    b = _Batch(px[:, sl], px[:, -1] - px[:, -2], p, idx, truth[f], wrong[f])
                    _score_batch(acc, (f, heads_name), b, masks, inside)
    out = {f"{f} {heads} {rule} {which}": a.result() for (f, heads, rule, which), a in acc.items()}
    return {
        "model": analysis.result.model.name,
        "n": n,
        "seed": seed,
        "mask_share": float(scenes.masks.mean()),
        "top_heads": {f: sets[f]["top"][0] for f in MAP_FEATURES},
        "scores": out,
    }


@dataclass
class _Batch:
    """One batch of one feature under one head set: every value's map ``values [B, V, H, W]``, the random
    direction's map ``noise [B, H, W]``, the images' reading ``p [B, V]``, their indices in the scene
    set and the right and wrong values of all scenes."""

    values: torch.Tensor
    noise: torch.Tensor
    p: torch.Tensor
    idx: list[int]
    truth: np.ndarray
    wrong: np.ndarray


def _score_batch(acc: dict, key: tuple, b: _Batch, masks: torch.Tensor, inside: bool) -> None:
    """Score one batch: both rules (:data:`RULES`) for the right and the wrong values, and the random direction."""
    rows, v = torch.arange(len(b.idx)), b.values.shape[1]
    for which, chosen in (("right", b.truth), ("wrong", b.wrong)):
        value = torch.as_tensor(chosen[b.idx], dtype=torch.long)
        maps = {
            "specific": specific_maps(b.values, b.p, value).maps,
            "mean_others": b.values[rows, value] - (b.values.sum(1) - b.values[rows, value]) / (v - 1),
        }
        for rule, m in maps.items():
            a = acc.setdefault((*key, rule, which), MapScores(inside))
            for j, i in enumerate(b.idx):
                a.add(m[j], masks[i])
    a = acc.setdefault((*key, "random_direction", "-"), MapScores(inside))
    for j, i in enumerate(b.idx):
        a.add(b.noise[j], masks[i])


def rule_heads(analysis: Analysis, layer_of: dict[str, int], feature: str) -> dict[str, list[str]]:
    """The head rules the study compares for ``feature``: the top ``2 ceil(sqrt(H))`` by score (the
    command's), the top ``ceil(sqrt(H))``, all heads, and three label-free layer rules (the first
    attention layer, the first half of the layers, the last layer); ``layer_of``: head -> block index."""
    heads = [h for h in analysis.result.labels if h in layer_of]
    layers = sorted(set(layer_of.values()))
    top = auto_heads(analysis.scores(feature), analysis.result.labels)
    half = layers[: max(1, len(layers) // 2)]
    return {
        "top": top,
        "top sqrt": top[: math.ceil(math.sqrt(len(heads)))],
        "all": heads,
        "first layer": [h for h in heads if layer_of[h] == layers[0]],
        "first half": [h for h in heads if layer_of[h] in half],
        "last layer": [h for h in heads if layer_of[h] == layers[-1]],
    }


def heatmap_rules(analysis: Analysis, n: int = 100, seed: int = EVAL_SEED, batch: int = 25) -> dict:
    """Every head rule of :func:`rule_heads` with the command's value-specific map: right and wrong
    values (``"specific"``) and the right value's map magnitude (``"magnitude"``: ``|map|``, a head may
    write a value with either sign), scored as :class:`MapScores` (pointing with ties at the first pixel
    or averaged, share, segmentation)."""
    scenes = make_scenes(n, seed=seed)
    masks = torch.from_numpy(scenes.masks)
    texts, where = feature_texts(analysis)
    truth = {f: scenes.labels(f) for f in MAP_FEATURES}
    wrong = {f: _wrong(truth[f], where[f].stop - where[f].start, seed) for f in MAP_FEATURES}
    acc: dict[str, MapScores] = {}
    sets = None
    for s in range(0, n, batch):
        idx = list(range(s, min(s + batch, n)))
        x = torch.stack([analysis.subject.preprocess(scenes.pil(i)) for i in idx])
        maps = token_maps(
            analysis.subject, x, texts, aligner=analysis.aligner, start_layer=analysis.result.start_layer or 0
        )
        if sets is None:
            layer_of = {lab.name: lab.layer for labs in maps.labels for lab in labs}
            sets = {f: rule_heads(analysis, layer_of, f) for f in MAP_FEATURES}
        cos = whole_scores(maps, analysis, texts)
        for f, (_, inside) in MAP_FEATURES.items():
            p = reading(cos[:, where[f]], analysis.logit_scale)
            for rule, heads in sets[f].items():
                values = maps.pixels(heads).float().cpu()[:, where[f]]
                for which, chosen in (("right", truth[f]), ("wrong", wrong[f])):
                    m = specific_maps(values, p, torch.as_tensor(chosen[idx], dtype=torch.long)).maps
                    runs = {"specific": m} if which == "wrong" else {"specific": m, "magnitude": m.abs()}
                    for how, mm in runs.items():
                        a = acc.setdefault(f"{f} {rule} {how} {which}", MapScores(inside))
                        for j, i in enumerate(idx):
                            a.add(mm[j], masks[i])
    heads = {f: {r: len(h) for r, h in rules.items()} for f, rules in (sets or {}).items()}
    return {
        "model": analysis.result.model.name,
        "n": n,
        "seed": seed,
        "heads": heads,
        "scores": {k: a.result() for k, a in acc.items()},
    }
