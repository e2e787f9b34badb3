"""Validate component scores against ground truths on held-out world scenes, one model at a time
(:func:`validate_model` of a :class:`ScoreRun`; every model and the random-init control:
:mod:`vitdecomp.commands.validate`).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from vitdecomp.align import evaluate
from vitdecomp.evaluation.agreement import spearman
from vitdecomp.evaluation.components import CONSTANT_RTOL, evaluated_components, relative_second_singular_value
from vitdecomp.evaluation.counterfactual import PartTruth, counterfactual_truths
from vitdecomp.evaluation.settings import (
    HELD_OUT_SEED,
    N_PAIRS,
    N_TEST,
    N_TRAIN,
    PAIR_SEED_OFFSET,
    SCORES,
    TRAIN_SEED,
)
from vitdecomp.evaluation.truths import (
    causal_importance,
    probe_importance,
    specificity,
    top_k_precision,
    zero_shot_causal,
)
from vitdecomp.evaluation.world_runs import WorldRun, prepare
from vitdecomp.scores import score_features
from vitdecomp.store import Rows
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES


def _silent(*args: Any, **kwargs: Any) -> None:
    """Say nothing (the score validation prints one line per model itself)."""


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


def unsigned_agreement(
    tables: dict, truths: dict[str, dict[str, np.ndarray]], keep: np.ndarray
) -> dict[str, dict[str, dict[str, float]]]:
    """Spearman of every score's magnitude ``|score|`` with the flow share's magnitude (``"flow"``) and
    with the causal truth as it is (``"causal_mean"``; a loss rise, near 0 for a part that does not
    matter either way) per attribute over the components ``keep``: how the signed scores compare when
    the sign is set aside."""
    targets = {"flow": {a: np.abs(v) for a, v in truths["flow"].items()}, "causal_mean": truths["causal_mean"]}
    return {
        m: {
            t: {a: spearman(table[a].abs().numpy()[keep], target[a][keep]) for a in CORE_ATTRIBUTES}
            for t, target in targets.items()
        }
        for m, table in tables.items()
    }


def _flow_truth_info(cf: dict[str, PartTruth], keep: np.ndarray) -> dict[str, dict[str, float]]:
    """Per attribute: the pairs used and dropped by the pixel check, and the flow share's split-half
    Spearman (even vs odd pairs) over the components ``keep``."""
    return {
        a: {
            "n_pairs": t.n_pairs,
            "dropped": t.dropped,
            "split_half": spearman(t.flow_halves[0][keep], t.flow_halves[1][keep]),
        }
        for a, t in cf.items()
    }


@dataclass(kw_only=True)
class ScoreRun(WorldRun):
    """One model's score validation (a :class:`~vitdecomp.evaluation.world_runs.WorldRun`: the aligner
    and the truths' probes fitted on the analysis set, everything else on the held-out seed): the
    ``scores`` compared, the ``planted`` heads of a planted-role model (``{attribute: [labels]}``) and
    ``n_pairs`` counterfactual pairs per attribute for the flow truth, drawn from world seed
    ``test_seed + PAIR_SEED_OFFSET`` (other images than the scored ones)."""

    n_train: int = N_TRAIN
    n_test: int = N_TEST
    train_seed: int = TRAIN_SEED
    test_seed: int = HELD_OUT_SEED
    scores: tuple[str, ...] = SCORES
    planted: dict[str, list[str]] | None = None
    n_pairs: int = N_PAIRS
    log: Callable[..., Any] = _silent


def validate_model(run: ScoreRun) -> dict[str, Any]:
    """Every score of ``run.scores`` against every truth for one model (see the module docstring);
    ``run.random_init``: the subject's weights are random (the reader keeps its trained weights)."""
    t0 = time.time()
    p = prepare(run)
    train, test, al = p.train, p.test, p.aligned.aligner
    labels = list(train.labels)
    c_te = test.batch(slice(None))["contributions"]
    keep = evaluated_components(labels, c_te)
    rel = relative_second_singular_value(c_te)
    tables = score_features(test, al, p.features, methods=run.scores, progress=run.progress)
    truths = compute_truths(
        train, test, p.train_source.attributes, p.test_source.attributes, al, p.classes, run.progress
    )
    cf = counterfactual_truths(p.models.subject, run.n_pairs, run.test_seed + PAIR_SEED_OFFSET, device=run.device)
    if any(t.labels != labels for t in cf.values()):
        raise RuntimeError("the counterfactual pairs' decomposition differs from the store's components")
    truths = {"flow": {a: t.flow for a, t in cf.items()}, "response": {a: t.response for a, t in cf.items()}, **truths}
    mag = magnitude(c_te)
    res: dict[str, Any] = {
        "model": run.name,
        "weights_id": p.models.subject.weights_id,
        "random_init": run.random_init,
        "train_seed": run.train_seed,
        "test_seed": run.test_seed,
        "n_train": len(train),
        "n_test": len(test),
        "labels": labels,
        "evaluated": [labels[i] for i in keep],
        "constant": [lab for lab, r in zip(labels, rel.tolist(), strict=True) if r < CONSTANT_RTOL],
        "test_cosine": evaluate(al, test)["cosine"],
        "scores": {m: t.to_dict() for m, t in tables.items()},
        "truths": {t: _per_label(v, labels) for t, v in truths.items()},
        "agreement": agreement(tables, truths, keep),
        "unsigned_agreement": unsigned_agreement(tables, truths, keep),
        "flow_truth": _flow_truth_info(cf, keep),
        "pair_seed": run.test_seed + PAIR_SEED_OFFSET,
        "magnitude": {t: {a: spearman(mag[keep], truths[t][a][keep]) for a in CORE_ATTRIBUTES} for t in truths},
        "top": {m: {a: [lab for lab, _ in t.ranking(a, 3)] for a in CORE_ATTRIBUTES} for m, t in tables.items()},
    }
    if run.planted:
        res["planted"] = {
            m: {a: top_k_precision(t[a].numpy(), labels, heads) for a, heads in run.planted.items()}
            for m, t in tables.items()
        }
        res["planted_truths"] = {
            t: {a: top_k_precision(truths[t][a], labels, heads) for a, heads in run.planted.items()}
            for t in ("flow", "causal_mean")
        }
    res["time_s"] = round(time.time() - t0, 1)
    return res
