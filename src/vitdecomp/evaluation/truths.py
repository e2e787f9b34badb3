"""Ground truths a component score is checked against, each computed with the images' labels
(which the scores never see).

``probe``
    Decodability: the held-out accuracy of a linear probe on the component's contribution alone
    (:func:`probe_importance`). Saturates (many components decode colour at
    1.00) and says what a part *encodes*, not what the representation *uses*.
``specificity``
    Decodability of one attribute relative to the others: the component's chance-normalised probe
    accuracy ``(acc - 1/K) / (1 - 1/K)`` for the attribute minus its best other attribute's.
``causal`` (mean / resample)
    Importance to the whole representation: a probe fitted on the whole representation (training
    images) reads the test images after one component's contribution is *mean-ablated* (replaced by its
    mean over the test images) or *resample-ablated* (replaced by its contribution to another test
    image, one random permutation); the truth is the rise of the probe's cross-entropy (nats; the
    accuracy drop is kept too but is mostly ties, a single part rarely flips a decision).
``zero-shot causal``
    The same in CLIP space: the aligned whole read zero-shot by the attribute's class texts
    (``100 * cos``), one aligned component mean-ablated; the rise of the cross-entropy of the true class.
    It goes through the aligner, like the scores, so it is the friendliest of the truths to them.
``planted``
    For the zoo's planted-role models: the heads the training objective made carry each attribute.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitdecomp.probes import batched_probe, fit_probes
from vitdecomp.store import Rows
from vitdecomp.world import CORE_ATTRIBUTES

ABLATIONS = ("mean", "resample")
ZERO_SHOT_SCALE = 100.0


def ablated_wholes(c: torch.Tensor, mode: str = "mean", seed: int = 0, components: slice | None = None) -> torch.Tensor:
    """The whole representation with one component ablated at a time: ``c [M, C, D]`` ->
    ``[C', M, D]`` (``components`` picks which, default all). ``mode``: ``"mean"`` replaces the
    component by its mean over the ``M`` images, ``"resample"`` by its value on another image (one
    random permutation, seeded)."""
    if mode not in ABLATIONS:
        raise ValueError(f"mode must be one of {ABLATIONS}, not {mode!r}")
    c = c.double()
    sel = c[:, components] if components is not None else c
    if mode == "mean":
        repl = sel.mean(0, keepdim=True).expand_as(sel)
    else:
        perm = torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))
        repl = sel[perm]
    return c.sum(1)[None] + (repl - sel).transpose(0, 1)


def _loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [C, M, K]``, ``y [M]`` -> mean cross-entropy ``[C]`` and accuracy ``[C]``."""
    c, m, k = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, k).float(), y.repeat(c), reduction="none").reshape(c, m).mean(1)
    return ce.double(), (logits.argmax(-1) == y[None]).double().mean(1)


@torch.no_grad()
def causal_importance(
    c_tr: torch.Tensor,
    y_tr: torch.Tensor,
    c_te: torch.Tensor,
    y_te: torch.Tensor,
    modes: tuple[str, ...] = ABLATIONS,
    seed: int = 0,
    chunk: int = 16,
) -> dict[str, dict[str, np.ndarray]]:
    """Causal importance of every component for one attribute: a probe on the whole representation
    (``c_tr [N, C, D]`` summed, labels ``y_tr``) reads the test images ``c_te [M, C, D]`` with each
    component ablated. Returns ``{mode: {"loss_rise": [C], "accuracy_drop": [C]}}`` and the
    unablated figures under ``"base"``."""
    k = int(max(y_tr.max(), y_te.max())) + 1
    with torch.enable_grad():
        probe = fit_probes(c_tr.sum(1)[None].float(), y_tr, k)
    base_loss, base_acc = _loss_and_accuracy(probe.logits(c_te.sum(1)[None].float()), y_te)
    out: dict[str, dict[str, np.ndarray]] = {"base": {"loss": base_loss.numpy(), "accuracy": base_acc.numpy()}}
    n_comp = c_te.shape[1]
    for mode in modes:
        losses, accs = [], []
        for s in range(0, n_comp, chunk):
            wholes = ablated_wholes(c_te, mode, seed, slice(s, s + chunk)).float()
            loss, acc = _loss_and_accuracy(probe.logits(wholes), y_te)
            losses.append(loss)
            accs.append(acc)
        out[mode] = {
            "loss_rise": (torch.cat(losses) - base_loss).numpy(),
            "accuracy_drop": (base_acc - torch.cat(accs)).numpy(),
        }
    return out


@torch.no_grad()
def zero_shot_causal(
    aligned: torch.Tensor, bias: torch.Tensor, classes: torch.Tensor, y: torch.Tensor, chunk: int = 16
) -> np.ndarray:
    """Rise of the zero-shot cross-entropy of the true class when each aligned component is
    mean-ablated: ``aligned [M, C, d]`` (+ ``bias [d]`` = the aligned whole), unit class texts
    ``classes [K, d]``, labels ``y [M]`` -> ``[C]``."""
    t = F.normalize(classes.double(), dim=-1)
    b = bias.double().cpu()

    def read(z: torch.Tensor) -> torch.Tensor:  # [C, M, d] -> [C, M, K]
        return ZERO_SHOT_SCALE * F.normalize(z + b, dim=-1) @ t.T

    base, _ = _loss_and_accuracy(read(aligned.double().sum(1)[None]), y)
    rises = []
    for s in range(0, aligned.shape[1], chunk):
        loss, _ = _loss_and_accuracy(read(ablated_wholes(aligned, "mean", 0, slice(s, s + chunk))), y)
        rises.append(loss - base)
    return torch.cat(rises).numpy()


def specificity(probe_accuracy: Mapping[str, np.ndarray], n_classes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per attribute ``[C]``: the chance-normalised probe accuracy for it minus the best of the
    other attributes' (positive: the component decodes this attribute better than any other)."""
    norm = {a: (np.asarray(v) - 1 / n_classes[a]) / (1 - 1 / n_classes[a]) for a, v in probe_accuracy.items()}
    out = {}
    for a, v in norm.items():
        others = np.stack([w for b, w in norm.items() if b != a])
        out[a] = v - others.max(0)
    return out


def top_k_precision(scores: np.ndarray, labels: list[str], planted: list[str], k: int | None = None) -> float:
    """Share of the ``k`` best-scored components (default ``k`` = the number planted) that are planted."""
    k = len(planted) if k is None else k
    if k == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(np.mean([labels[i] in planted for i in order]))


def probe_importance(
    train: Rows,
    test: Rows,
    attrs_tr: dict[str, np.ndarray],
    attrs_te: dict[str, np.ndarray],
    max_train: int = 2000,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Held-out probe accuracy of each component alone for each attribute: ``{attr: [C]}``."""
    n_tr = min(max_train, len(train))
    c_tr = train.batch(slice(0, n_tr))["contributions"]
    c_te = test.batch(slice(None))["contributions"]
    x_tr, x_te = c_tr.transpose(0, 1).contiguous(), c_te.transpose(0, 1).contiguous()
    out = {}
    for a in tqdm(CORE_ATTRIBUTES, desc="probe components", disable=not progress):
        y_tr = torch.from_numpy(attrs_tr[a][:n_tr]).long()
        y_te = torch.from_numpy(attrs_te[a]).long()
        out[a] = batched_probe(x_tr, y_tr, x_te, y_te)
    return out
