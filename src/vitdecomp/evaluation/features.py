"""Ground truth for ``vitdecomp features`` on the built-in world (docs/features.md).

For one model (:class:`FeatureRun`): the analysis of ``n_train`` scenes of ``train_seed`` (its store and
aligner as ``vitdecomp analyze`` makes them, :func:`vitdecomp.evaluation.world_runs.prepare`) and the
SAE the command trains on it (its defaults); then, on images the SAE never saw:

* **reconstruction**: explained variance and L0 on the held-out tenth of the analysis and on
  ``n_test`` fresh scenes of ``test_seed``; dead latents (never firing on the analysed images);
* **detection**: for every attribute value (6 shapes, 6 colours, 4 patterns, 5 backgrounds), the
  latent whose activation best separates the fresh scenes with that value from the rest (AUROC);
  detected when its AUROC is at least :data:`AUROC_TARGET`;
* **names**: for each detected latent, its name among the attribute's values (its decoder direction
  through the aligner, :mod:`vitdecomp.apps.feature_names`) against the true value; also the
  automatic name over every candidate (the features' values and the world vocabulary);
* **completeness**: the split's largest relative error over the analysed images (float32);
* **location**: for each detected latent, the Spearman correlation between its parts' shares and
  the counterfactual flow share of its attribute (:mod:`vitdecomp.evaluation.counterfactual`, pairs
  of ``pair_seed``), over the direct branches that vary (:mod:`vitdecomp.evaluation.components`).

A control runs the same with the subject's weights random (``random_init``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vitdecomp.align import whole_map
from vitdecomp.apps.feature_names import candidates, latent_directions, name_in, name_latents
from vitdecomp.apps.latents import measure_latents
from vitdecomp.defaults import READER
from vitdecomp.evaluation.agreement import spearman
from vitdecomp.evaluation.components import evaluated_components
from vitdecomp.evaluation.counterfactual import counterfactual_pairs, counterfactual_truth
from vitdecomp.evaluation.world_runs import WorldRun, prepare
from vitdecomp.sae import SparseAutoencoder
from vitdecomp.sae.training import SaeTrainConfig, train_sae
from vitdecomp.store import Rows
from vitdecomp.text import WORLD_TEMPLATES, load_vocabulary
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES, make_scenes

AUROC_TARGET = 0.95
SPEARMAN_TARGET = 0.8


@dataclass(kw_only=True)
class FeatureRun:
    """One model's ground-truth run (see the module text); ``sae``: the training options (default: the
    command's)."""

    name: str
    train_seed: int
    test_seed: int
    pair_seed: int
    reader: str = READER
    n_train: int = 6000
    n_test: int = 1000
    n_pairs: int = 512
    random_init: bool = False
    sae: SaeTrainConfig = field(default_factory=SaeTrainConfig)
    cache_dir: str | Path | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass
class ValueRow:
    """One attribute value: its best latent, that latent's AUROC, names (among the attribute's values;
    over every candidate) and the Spearman of its parts' shares with the attribute's flow share."""

    attribute: str
    value: str
    latent: int
    auroc: float
    detected: bool
    name_in_attribute: str
    name: str
    spearman: float

    @property
    def named(self) -> bool:
        return self.name_in_attribute == self.value


@dataclass
class FeatureValidation:
    """The figures of one run (see the module text)."""

    model: str
    random_init: bool
    latents: int
    k: int
    explained_variance_held_out: float
    explained_variance_test: float
    l0_test: float
    dead_fraction: float
    max_split_error: float
    rows: list[ValueRow]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def detected(self) -> list[ValueRow]:
        return [r for r in self.rows if r.detected]

    def summary(self) -> dict[str, float]:
        det = self.detected
        rho = [r.spearman for r in det if np.isfinite(r.spearman)]
        return {
            "detected": len(det) / max(len(self.rows), 1),
            "named": sum(r.named for r in det) / max(len(det), 1),
            "named_automatic": sum(r.value in r.name for r in det) / max(len(det), 1),
            "spearman_mean": float(np.mean(rho)) if rho else float("nan"),
            "spearman_at_target": float(np.mean([x >= SPEARMAN_TARGET for x in rho])) if rho else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def _codes(rows: Rows, sae: SparseAutoencoder) -> tuple[torch.Tensor, float]:
    """Latents ``[N, L]`` of every row and the explained variance of the representation."""
    zs, sse, reps = [], 0.0, []
    for b in rows.iter_batches(1024, ("representation",)):
        r = b["representation"]
        z = sae.encode(r)
        sse += float((r - sae.decode(z, r)).double().square().sum())
        zs.append(z)
        reps.append(r.double())
    r = torch.cat(reps)
    return torch.cat(zs), 1.0 - sse / float((r - r.mean(0)).square().sum())


def _aurocs(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``[L]``: AUROC of each latent's activation for "the label is ``k``" (0.5 for a silent latent)."""
    y = (labels == k).astype(int)
    return np.array([roc_auc_score(y, z[:, j]) if z[:, j].std() > 0 else 0.5 for j in range(z.shape[1])])


def _flows(run: FeatureRun, subject: Any, labels: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for attribute in CORE_ATTRIBUTES:
        truth = counterfactual_truth(
            subject, counterfactual_pairs(run.n_pairs, run.pair_seed, attribute), device=run.device
        )
        if truth.labels != labels:
            raise RuntimeError(f"counterfactual parts {truth.labels[:3]}... differ from the store's {labels[:3]}...")
        out[attribute] = truth.flow
    return out


@dataclass
class _Trained:
    """What :func:`validate_features` reads the latents with: the SAE, its pass over the analysed
    images, its latents on the fresh scenes and their explained variance."""

    sae: SparseAutoencoder
    measures: Any
    z_test: torch.Tensor
    ev_test: float


def _train(run: FeatureRun, p: Any) -> _Trained:
    trained = train_sae(p.train, run.sae, run.progress)
    held = np.zeros(len(p.train), bool)
    held[trained.split.val] = True
    m = measure_latents(p.train, trained.sae, held, progress=run.progress)
    z_test, ev_test = _codes(p.test, trained.sae)
    return _Trained(trained.sae, m, z_test, ev_test)


def validate_features(run: FeatureRun) -> FeatureValidation:
    """Every figure of the module text for one model."""
    t0 = time.time()
    p = prepare(
        WorldRun(name=run.name, reader=run.reader, n_train=run.n_train, n_test=run.n_test, train_seed=run.train_seed,
                 test_seed=run.test_seed, random_init=run.random_init, cache_dir=run.cache_dir, device=run.device,
                 progress=run.progress)
    )  # fmt: skip
    clock = {"prepare": time.time() - t0}
    t, labels = _train(run, p), list(p.train.labels or [])
    clock["sae"] = time.time() - t0 - clock["prepare"]
    features = {a: list(ATTRIBUTES[a]) for a in CORE_ATTRIBUTES}
    cands = candidates(features, load_vocabulary("world"), lambda texts: p.encoder.encode(texts, WORLD_TEMPLATES))
    dirs = latent_directions(t.sae.decoder_directions(), whole_map(p.train, p.aligned.aligner))
    names = name_latents(dirs, cands)
    flows = _flows(run, p.models.subject, labels)
    keep = evaluated_components(labels, p.train.batch(slice(0, 1000), ("contributions",))["contributions"])
    scenes, z = make_scenes(run.n_test, seed=run.test_seed), t.z_test.numpy()
    rows = []
    for attribute in CORE_ATTRIBUTES:
        for k, value in enumerate(ATTRIBUTES[attribute]):
            au = _aurocs(z, scenes.attributes[attribute], k)
            j = int(au.argmax())
            rho = spearman(t.measures.shares[keep, j], flows[attribute][keep])
            named = name_in(dirs[j], cands, attribute)
            rows.append(
                ValueRow(attribute, value, j, float(au[j]), bool(au[j] >= AUROC_TARGET), named, names[j].text, rho)
            )
    m = t.measures
    return FeatureValidation(
        run.name, run.random_init, t.sae.n_latents, int(t.sae.k or 0), m.explained_variance, t.ev_test,
        float((t.z_test > 0).sum(1).float().mean()), float((m.frequency == 0).mean()), m.max_error, rows,
        {**clock, "total": time.time() - t0},
    )  # fmt: skip


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:.0f} %"


def summary_table(results: list[FeatureValidation]) -> list[str]:
    """One Markdown row per run: the figures of every "Done when" item."""
    head = (
        "| model | weights | latents (k) | EV held-out / fresh | L0 | dead | split error (max) "
        "| detected (AUROC >= 0.95) | named right | named right (automatic) "
        "| parts vs flow share: mean Spearman (share >= 0.8) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary()
        cells = [
            r.model,
            "random" if r.random_init else "trained",
            f"{r.latents} ({r.k})",
            f"{r.explained_variance_held_out:.3f} / {r.explained_variance_test:.3f}",
            f"{r.l0_test:.1f}",
            _pct(r.dead_fraction),
            f"{r.max_split_error:.1e}",
            f"{len(r.detected)}/{len(r.rows)} ({_pct(s['detected'])})",
            _pct(s["named"]),
            _pct(s["named_automatic"]),
            f"{s['spearman_mean']:.2f} ({_pct(s['spearman_at_target'])})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def value_table(r: FeatureValidation) -> list[str]:
    """One Markdown row per attribute value of a run."""
    lines = [
        f"### {r.model} ({'random weights' if r.random_init else 'trained'})",
        "",
        "| attribute | value | latent | AUROC | name (among the values) | name (automatic) | Spearman vs flow |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r.rows:
        mark = "" if x.detected else " (not detected)"
        lines.append(
            f"| {x.attribute} | {x.value} | {x.latent} | {x.auroc:.3f}{mark} | {x.name_in_attribute} | {x.name} | "
            f"{x.spearman:.2f} |"
        )
    return [*lines, ""]
