"""Evaluation heads that read a (possibly ablated) representation, and group accuracies.

* :class:`LinearHead` — a logistic regression on the frozen representation (the project's one
  logistic regression, :func:`vitdecomp.probes.fit_probes`: standardised features, L-BFGS,
  ``l2 * ||W||^2``), fitted once and then applied unchanged to edited representations.
* :func:`dfr_head` — deep feature reweighting (Kirichenko et al. 2023): the same regression fitted
  on a *group-balanced* subset of the validation split (every group subsampled to the smallest
  one's size; the logits of ``draws`` subsamples averaged). It sees group labels, so it is a trained
  reference (an upper bound), not a label-free method.
* :class:`ZeroShotHead` — CLIP-space reading: the class with the highest cosine to the class texts.
* :func:`project_out` — remove the span of some text directions from CLIP-space vectors.
* :class:`GroupAccuracy` — accuracy per ``(y, place)`` group, the worst group and the average
  over groups (on a group-balanced split the average equals the plain accuracy).
* :func:`own_heads` — the subject's own classifier, one :class:`LogitBlockHead` per attribute, when
  it reads the decomposed representation (the zoo's multi-attribute models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp.models.loaded import LoadedModel
from vitdecomp.probes import Probe, fit_probes
from vitdecomp.scores.functions import feature_basis

#: Strength of the heads' L2 penalty on standardised features (as the project's probes).
HEAD_L2 = 1e-3


@dataclass
class LinearHead:
    """A multinomial logistic regression on ``[N, D]`` vectors (one fitted :class:`Probe`)."""

    probe: Probe

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor | np.ndarray, l2: float = HEAD_L2) -> LinearHead:
        """Fit on ``x [N, D]`` with integer labels ``y [N]`` (classes ``0..max(y)``, at least 2)."""
        y = torch.as_tensor(np.asarray(y)).long()
        n_classes = max(int(y.max()) + 1, 2)
        with torch.enable_grad():
            return cls(fit_probes(x.float()[None], y, n_classes, l2))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., N, D]`` -> ``[..., N, K]``."""
        lead = x.shape[:-2]
        out = self.probe.logits(x.float().reshape(-1, *x.shape[-2:]))
        return out.reshape(*lead, *out.shape[-2:])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``[..., N]``."""
        return self.logits(x).argmax(-1)


def dfr_head(
    x: torch.Tensor, y: np.ndarray, group: np.ndarray, draws: int = 5, seed: int = 0, l2: float = HEAD_L2
) -> AveragedHead:
    """DFR on ``x [N, D]`` (the validation split) with labels ``y [N]`` and groups ``group [N]``:
    ``draws`` heads, each fitted on a fresh group-balanced subsample, their logits averaged."""
    rng = np.random.default_rng(seed)
    groups = np.unique(group)
    size = min(int((group == g).sum()) for g in groups)
    heads = []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(np.flatnonzero(group == g), size, replace=False) for g in groups])
        heads.append(LinearHead.fit(x[torch.from_numpy(pick)], y[pick], l2))
    return AveragedHead(heads)


@dataclass
class AveragedHead:
    """Heads whose logits are averaged."""

    heads: list[LinearHead]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h.logits(x) for h in self.heads]).mean(0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


@dataclass
class ZeroShotHead:
    """Reads CLIP-space vectors by their cosine to unit class texts ``classes [K, d]``."""

    classes: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1) @ F.normalize(self.classes.float(), dim=-1).T

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


def project_out(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` with the span of ``directions [r, d]`` removed (orthogonal projection)."""
    basis = feature_basis(directions.double(), method="invariant").to(x.dtype)  # [d, r']
    return x - (x @ basis) @ basis.T


def accuracy(pred: torch.Tensor | np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean()) if len(y) else float("nan")


@dataclass
class GroupAccuracy:
    """Accuracy per group (``"y=0,place=1"`` -> accuracy), the worst group's and the mean over groups."""

    groups: dict[str, float]
    worst: float
    average: float

    @classmethod
    def of(cls, pred: torch.Tensor | np.ndarray, y: np.ndarray, place: np.ndarray) -> GroupAccuracy:
        """Group accuracies of predictions ``pred [N]`` for labels ``y [N]`` and places ``place [N]``."""
        pred, y, place = np.asarray(pred), np.asarray(y), np.asarray(place)
        groups = {}
        for gy in (0, 1):
            for gp in (0, 1):
                m = (y == gy) & (place == gp)
                if m.any():
                    groups[f"y={gy},place={gp}"] = accuracy(pred[m], y[m])
        values = list(groups.values())
        return cls(groups, min(values), float(np.mean(values)))

    def to_dict(self) -> dict[str, object]:
        return {"groups": self.groups, "worst": self.worst, "average": self.average}


@dataclass
class LogitBlockHead:
    """One feature's block of a linear classifier's logits: ``weight [K, D]``, ``bias [K]``."""

    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.T + self.bias).argmax(-1)


@torch.no_grad()
def own_heads(subject: LoadedModel, image: Any, parts: torch.Tensor) -> dict[str, LogitBlockHead]:
    """The subject's own classifier per world attribute, when it has one that reads the decomposed
    representation: a linear ``get_classifier()`` with one logit block per attribute head the model
    declares (:attr:`vitdecomp.models.loaded.LoadedModel.attribute_heads`, the zoo's multi-attribute
    task) whose output on the summed ``parts [1, C, D]`` of ``image`` (a PIL image) equals the model's
    own logits. ``{}`` otherwise."""
    model, sizes = subject.model, subject.attribute_heads
    n_logits = sum(sizes.values())
    fc = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not sizes or not isinstance(fc, torch.nn.Linear) or fc.out_features != n_logits:
        return {}
    x = subject.preprocess(image)[None].to(fc.weight.device)
    logits = model(x).float().cpu()
    w, b = fc.weight.detach().float().cpu(), fc.bias.detach().float().cpu()
    if logits.shape != (1, n_logits) or not torch.allclose(parts[:1].float().sum(1) @ w.T + b, logits, atol=1e-3):
        return {}
    ends = np.cumsum([0, *sizes.values()])
    return {a: LogitBlockHead(w[s:e], b[s:e]) for a, s, e in zip(sizes, ends[:-1], ends[1:], strict=True)}
