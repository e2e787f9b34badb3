"""Validate component scores against ground truths on held-out world scenes, one model at a time
(:func:`validate_model`; every model and the random-init control: :mod:`vitdecomp.evaluation.cli`).

Data (seeds: :mod:`vitdecomp.evaluation.settings`): the aligner is trained (or loaded from the cache)
on the ``vitdecomp analyze`` set; the probes behind the truths are fitted on that set too. Every score
and every truth is then computed on ``n_test`` scenes of ``test_seed`` (default: the held-out seed).
Agreement is the Spearman rank correlation between a score and a truth over the evaluated components
only: direct branches that vary over the images (:mod:`vitdecomp.evaluation.components`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdecomp.align import evaluate
from vitdecomp.evaluation.components import CONSTANT_RTOL, evaluated_components, relative_second_singular_value
from vitdecomp.evaluation.probes import probe_importance
from vitdecomp.evaluation.settings import HELD_OUT_SEED, N_TEST, N_TRAIN, SCORES, TRAIN_SEED
from vitdecomp.evaluation.truths import causal_importance, specificity, top_k_precision, zero_shot_causal
from vitdecomp.imageset import world_source
from vitdecomp.pipeline.config import default_cache_dir
from vitdecomp.pipeline.stages import Models, build_store, get_aligner, load_model_for, readable_rows
from vitdecomp.score import embed_features, load_features, score_features, spearman
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
    """Every score of ``scores`` against every truth for one model (see the module docstring)."""
    t0 = time.time()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = Models(load_model_for(name, None, random_init, device), load_model_for(reader, None, random_init, device))
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
        "top": {m: {a: [lab for lab, _ in t.ranking(a, 3)] for a in CORE_ATTRIBUTES} for m, t in tables.items()},
    }
    if planted:
        res["planted"] = {
            m: {a: top_k_precision(t[a].numpy(), labels, heads) for a, heads in planted.items()}
            for m, t in tables.items()
        }
    res["time_s"] = round(time.time() - t0, 1)
    return res
