"""Retrieval measured on the built-in world's ground truth (see :mod:`vitdecomp.evaluation.app_heatmaps`).

Text retrieval: for every value of every core attribute, the precision@20 of ranking fresh scenes by
the value's text through the feature's top-k components, the whole representation, and k random
components (5 draws). Image retrieval: for each feature F and 50 reference scenes, the share of the
top 20 (the reference excluded) that share the reference's F, and for every other attribute the
share that share it minus chance (the share of the whole set that shares it): F's top-k components
read as F's values (the command's default), compared inside the span of F's texts, by plain cosine,
and the whole representation by plain cosine.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from vitdecomp.api import decompose
from vitdecomp.apps.analysis import Analysis, auto_k
from vitdecomp.apps.retrieval import (
    TOP_N,
    Gallery,
    gallery_of,
    image_scores,
    text_scores,
    top_components,
)
from vitdecomp.world import CORE_ATTRIBUTES, make_scenes

N_RANDOM = 5
N_REFERENCES = 50


@torch.no_grad()
def world_gallery(analysis: Analysis, n: int, seed: int, batch: int) -> tuple[Gallery, dict[str, np.ndarray]]:
    scenes = make_scenes(n, seed=seed)
    parts = []
    for s in range(0, n, batch):
        x = torch.stack([analysis.subject.preprocess(scenes.pil(i)) for i in range(s, min(s + batch, n))])
        parts.append(decompose(analysis.subject, x, start_layer=analysis.result.start_layer or 0).contributions)
    gallery = gallery_of(analysis, torch.cat(parts), [f"world-{seed}-{i:06d}" for i in range(n)])
    return gallery, {a: scenes.labels(a) for a in CORE_ATTRIBUTES}


def _precision(scores: torch.Tensor, truth: np.ndarray, value: int) -> float:
    top = scores.argsort(descending=True)[:TOP_N].numpy()
    return float((truth[top] == value).mean())


def text_precision(analysis: Analysis, gallery: Gallery, truth: dict, k: int) -> dict:
    rng = random.Random(0)
    out = {}
    for f in CORE_ATTRIBUTES:
        values = list(analysis.result.features[f])
        emb = analysis.embed(values)
        comps = top_components(analysis.scores(f), k)
        rand = [rng.sample(gallery.labels, k) for _ in range(N_RANDOM)]
        rows = {"top_k": [], "full": [], "random_k": []}
        for v, t in enumerate(emb):
            rows["top_k"].append(_precision(text_scores(gallery, t, comps), truth[f], v))
            rows["full"].append(_precision(text_scores(gallery, t, None), truth[f], v))
            rows["random_k"].append(np.mean([_precision(text_scores(gallery, t, r), truth[f], v) for r in rand]))
        out[f] = {
            name: {"mean": float(np.mean(p)), "per_value": dict(zip(values, map(float, p), strict=True))}
            for name, p in rows.items()
        }
    return out


def _shares(scores: torch.Tensor, ref: int, truth: dict) -> dict[str, float]:
    order = [i for i in scores.argsort(descending=True).tolist() if i != ref][:TOP_N]
    out = {}
    for a, lab in truth.items():
        same = float((lab[order] == lab[ref]).mean())
        chance = float((np.delete(lab, ref) == lab[ref]).mean())
        out[a] = (same, same - chance)
    return out


def image_shares(analysis: Analysis, gallery: Gallery, truth: dict, k: int) -> dict:
    refs = list(range(min(N_REFERENCES, len(gallery.ids))))
    out = {}
    for f in CORE_ATTRIBUTES:
        comps = top_components(analysis.scores(f), k)
        texts = analysis.embed(list(analysis.result.features[f]))
        variants = {
            "top_k_reading": (comps, "reading"),
            "top_k_span": (comps, "span"),
            "top_k_cosine": (comps, "cosine"),
            "full_cosine": (None, "cosine"),
        }
        res = {}
        for name, (c, how) in variants.items():
            per = [_shares(image_scores(gallery, r, c, texts, how), r, truth) for r in refs]
            res[name] = {
                "same_" + f: float(np.mean([p[f][0] for p in per])),
                "others_above_chance": {a: float(np.mean([p[a][1] for p in per])) for a in truth if a != f},
            }
        out[f] = res
    return out


def evaluate_world(analysis: Analysis, n: int = 1000, seed: int = 7100, batch: int = 50) -> dict:
    """Text precision@20 and image-retrieval shares on ``n`` fresh world scenes."""
    gallery, truth = world_gallery(analysis, n, seed, batch)
    k = auto_k(len(gallery.labels))
    return {
        "model": analysis.result.model.name,
        "n": n,
        "seed": seed,
        "k": k,
        "text_precision_at_20": text_precision(analysis, gallery, truth, k),
        "image_retrieval_top20": image_shares(analysis, gallery, truth, k),
    }
