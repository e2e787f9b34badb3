"""Validate component scores against ground truths on held-out world scenes, one model at a time
(:func:`validate_model`; every model and the random-init control: :mod:`vitdecomp.evaluation.cli`).

Data (seeds: :mod:`vitdecomp.evaluation.settings`): the aligner is trained (or loaded from the cache)
on the ``vitdecomp analyze`` set; the probes behind the truths are fitted on that set too. Every score
and every truth is then computed on ``n_test`` scenes of ``test_seed`` (default: the held-out seed).
Agreement is the Spearman rank correlation between a score and a truth over the evaluated components
only: direct branches that vary over the images (:mod:`vitdecomp.evaluation.components`).

The random-init control (:func:`control_agreement`) replaces the *subject's* weights by random ones and
keeps everything else (the CLIP that reads it, the texts, the images, the aligner's training); its
scores are compared with the *trained* model's causal truth, component by component (same
architecture, same labels). A score that finds what the trained model uses cannot be reproduced
without the trained weights, so that figure should be near 0. Its agreement with the random model's
own truth is kept beside it: a faithful estimator of causal importance *should* agree there too (a
random network's large parts still carry colour), so that figure is not a control.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from vitdecomp.align import evaluate
from vitdecomp.evaluation.agreement import spearman
from vitdecomp.evaluation.components import CONSTANT_RTOL, evaluated_components, relative_second_singular_value
from vitdecomp.evaluation.settings import HELD_OUT_SEED, N_TEST, N_TRAIN, SCORES, TRAIN_SEED
from vitdecomp.evaluation.truths import (
    causal_importance,
    probe_importance,
    specificity,
    top_k_precision,
    zero_shot_causal,
)
from vitdecomp.imageset import world_source
from vitdecomp.pipeline.config import default_cache_dir
from vitdecomp.pipeline.stages import Models, build_store, get_aligner, load_model_for, readable_rows
from vitdecomp.scores import embed_features, load_features, score_features
from vitdecomp.store import Rows
from vitdecomp.text import WORLD_TEMPLATES, TextEncoder, world_class_embeddings
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES


def _per_label(values: dict[str, np.ndarray], labels: list[str]) -> dict[str, dict[str, float]]:
    return {a: {lab: float(x) for lab, x in zip(labels, v.tolist(), strict=True)} for a, v in values.items()}


def compute_truths(train: Rows, test: Rows, attrs_tr: dict, attrs_te: dict, al, classes, progress=True):
    """Every truth of :mod:`vitdecomp.evaluation.truths` for every attribute: ``{truth: {attr: [C]}}``."""
    c_tr = train.batch(slice(None))["contributions"]
    c_te = test.batch(slice(None))["contributions"]
    causal = {"causal_mean": {}, "causal_resample": {}, "zero_shot_causal": {}}
    aligned = al.apply(c_te).double().cpu()
    for a in CORE_ATTRIBUTES:
        y_tr, y_te = torch.from_numpy(attrs_tr[a]).long(), torch.from_numpy(attrs_te[a]).long()
        ci = causal_importance(c_tr, y_tr, c_te, y_te)
        causal["causal_mean"][a] = ci["mean"]["loss_rise"]
        causal["causal_resample"][a] = ci["resample"]["loss_rise"]
        causal["zero_shot_causal"][a] = zero_shot_causal(aligned, al.bias.cpu(), classes[a], y_te)
    probe = probe_importance(train, test, attrs_tr, attrs_te, progress=progress)
    spec = specificity(probe, {a: len(ATTRIBUTES[a]) for a in CORE_ATTRIBUTES})
    return {**causal, "probe": probe, "specificity": spec}


def magnitude(contributions: torch.Tensor) -> np.ndarray:
    """The label- and text-free baseline: each component's mean centred norm over the images,
    ``contributions [N, C, D]`` -> ``[C]`` (the same ranking for every feature)."""
    c = contributions.double()
    return (c - c.mean(0)).norm(dim=-1).mean(0).numpy()


def control_agreement(control: dict[str, Any], trained: dict[str, Any], truth: str = "causal_mean") -> dict:
    """Spearman of each score of a random-init ``control`` run with the ``trained`` run's ``truth``
    (both results of :func:`validate_model` for the same architecture), over the trained run's
    evaluated components: ``{score: {attr: rho}}``, plus the random model's own truth against the
    trained one under ``"truth"``."""
    keep = trained["evaluated"]
    target = trained["truths"][truth]

    def rho(values: dict[str, dict[str, float]]) -> dict[str, float]:
        return {a: spearman([values[a][lab] for lab in keep], [target[a][lab] for lab in keep]) for a in target}

    out = {m: rho(s) for m, s in control["scores"].items()}
    out["truth"] = rho(control["truths"][truth])
    return out


def _unit_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, centred and scaled to unit norm (so a dot product is Spearman)."""
    r = rankdata(x, axis=-1)
    r = r - r.mean(-1, keepdims=True)
    return r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-300)


def control_null(
    control: dict[str, Any], trained: dict[str, Any], n_perm: int = 2000, seed: int = 0, truth: str = "causal_mean"
) -> dict[str, dict[str, float]]:
    """How far from 0 a control figure is noise: each score of the random-init ``control`` with its
    components shuffled (one permutation for every attribute, ``n_perm`` draws), its mean Spearman over
    the attributes with the ``trained`` truth. ``{score: {"observed", "low", "high", "p"}}``: the observed
    mean, the null's 2.5 and 97.5 % quantiles, and the two-sided
    ``p = (1 + #{|null| >= |observed|}) / (1 + n_perm)``."""
    keep = trained["evaluated"]
    attrs = list(trained["truths"][truth])
    t = _unit_ranks(np.array([[trained["truths"][truth][a][lab] for lab in keep] for a in attrs]))  # [A, C]
    g = np.random.default_rng(seed)
    perms = np.stack([g.permutation(len(keep)) for _ in range(n_perm)])  # [P, C]
    out = {}
    for m, values in control["scores"].items():
        s = _unit_ranks(np.array([[values[a][lab] for lab in keep] for a in attrs]))  # [A, C]
        observed = float((s * t).sum(1).mean())
        null = (s[:, perms] * t[:, None]).sum(-1).mean(0)  # [P]
        low, high = np.quantile(null, [0.025, 0.975])
        p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + n_perm)
        out[m] = {"observed": observed, "low": float(low), "high": float(high), "p": float(p)}
    return out


def agreement(
    tables: dict, truths: dict[str, dict[str, np.ndarray]], keep: np.ndarray
) -> dict[str, dict[str, dict[str, float]]]:
    """Spearman of every score with every truth per attribute over the components ``keep``."""
    return {
        m: {t: {a: spearman(table[a].numpy()[keep], truths[t][a][keep]) for a in CORE_ATTRIBUTES} for t in truths}
        for m, table in tables.items()
    }


def validate_model(
    name: str,
    reader: str = "zoo:clip",
    *,
    scores: tuple[str, ...] = SCORES,
    test_seed: int = HELD_OUT_SEED,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    random_init: bool = False,
    planted: dict[str, list[str]] | None = None,
    cache_dir: str | Path | None = None,
    align_steps: int = 3000,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Every score of ``scores`` against every truth for one model (see the module docstring);
    ``random_init``: the subject's weights are random (the reader keeps its trained weights)."""
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = Models(load_model_for(name, None, random_init, device), load_model_for(reader, None, False, device))
    src_tr, src_te = world_source(n_train, seed=TRAIN_SEED), world_source(n_test, seed=test_seed)
    train, test = (
        readable_rows(build_store(models, s, cache / "stores", device=device, progress=progress).store)
        for s in (src_tr, src_te)
    )
    al = get_aligner(
        train, cache / "aligners", max_steps=align_steps, device=device, progress=progress, log=lambda *a, **k: None
    ).aligner
    encoder = TextEncoder.from_loaded(models.reader, cache_dir=cache / "text", device=device)
    feat_emb = embed_features(lambda t: encoder.encode(t, WORLD_TEMPLATES), load_features("world"))
    classes = world_class_embeddings(lambda texts: encoder.encode(texts, ("{}",)))
    labels = list(train.labels)
    c_te = test.batch(slice(None))["contributions"]
    keep = evaluated_components(labels, c_te)
    rel = relative_second_singular_value(c_te)
    tables = score_features(test, al, feat_emb, methods=scores, progress=progress)
    truths = compute_truths(train, test, src_tr.attributes, src_te.attributes, al, classes, progress)
    mag = magnitude(c_te)
    res: dict[str, Any] = {
        "model": name,
        "weights_id": models.subject.weights_id,
        "random_init": random_init,
        "train_seed": TRAIN_SEED,
        "test_seed": test_seed,
        "n_train": len(train),
        "n_test": len(test),
        "labels": labels,
        "evaluated": [labels[i] for i in keep],
        "constant": [lab for lab, r in zip(labels, rel.tolist(), strict=True) if r < CONSTANT_RTOL],
        "test_cosine": evaluate(al, test)["cosine"],
        "scores": {m: t.to_dict() for m, t in tables.items()},
        "truths": {t: _per_label(v, labels) for t, v in truths.items()},
        "agreement": agreement(tables, truths, keep),
        "magnitude": {t: {a: spearman(mag[keep], truths[t][a][keep]) for a in CORE_ATTRIBUTES} for t in truths},
        "top": {m: {a: [lab for lab, _ in t.ranking(a, 3)] for a in CORE_ATTRIBUTES} for m, t in tables.items()},
    }
    if planted:
        res["planted"] = {
            m: {a: top_k_precision(t[a].numpy(), labels, heads) for a, heads in planted.items()}
            for m, t in tables.items()
        }
    res["time_s"] = round(time.time() - t0, 1)
    return res
