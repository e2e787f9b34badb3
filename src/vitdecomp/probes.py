"""Linear probes, the project's one logistic regression: many multinomial regressions fitted at once
on standardised features (:func:`fit_probes`; L-BFGS, ``l2 * ||W||^2``), their held-out accuracy
(:func:`batched_probe`), and the fitted :class:`Probe`, which can be applied to edited
representations. Scores (``text_probe``), applications (probe heads) and the validation harness
(probe truths) all fit theirs here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Probe:
    """Multinomial logistic regressions on standardised features, one per leading index:
    ``mu``/``sd [C, 1, D]``, ``weight [C, D, K]``, ``bias [C, 1, K]``."""

    mu: torch.Tensor
    sd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [C, M, D]`` -> ``[C, M, K]``."""
        return ((x - self.mu) / self.sd) @ self.weight + self.bias


def fit_probes(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    n_classes: int,
    l2: float = 1e-3,
    on_evaluation: Callable[[int], None] | None = None,
) -> Probe:
    """Fit one probe per component at once: ``x_tr [C, N, D]``, ``y_tr [N]`` (or ``[C, N]``: each
    probe its own labels). The joint loss is the sum of the components' separate losses
    (standardised features, mean cross-entropy + ``l2 * ||W||^2``, as
    :func:`vitdecomp.zoo.evaluate.linear_probe`), so its minimiser is every component's own probe
    (L-BFGS). ``on_evaluation(i)`` is called after the loss's ``i``-th evaluation (a progress bar's hook)."""
    x_tr = x_tr.float()
    mu, sd = x_tr.mean(1, keepdim=True), x_tr.std(1, keepdim=True) + 1e-6
    a = (x_tr - mu) / sd
    c, _, d = a.shape
    w = torch.zeros(c, d, n_classes, requires_grad=True)
    bias = torch.zeros(c, 1, n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")
    target = y_tr.reshape(-1) if y_tr.dim() == 2 else y_tr.repeat(c)
    evaluations = 0

    def closure():
        nonlocal evaluations
        opt.zero_grad()
        logits = (a @ w + bias).reshape(-1, n_classes)
        loss = F.cross_entropy(logits, target, reduction="sum") / y_tr.shape[-1] + l2 * (w * w).sum()
        loss.backward()
        evaluations += 1
        if on_evaluation is not None:
            on_evaluation(evaluations)
        return loss

    opt.step(closure)
    return Probe(mu, sd, w.detach(), bias.detach())


def batched_probe(
    x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, l2: float = 1e-3
) -> np.ndarray:
    """Held-out accuracy ``[C]`` of one probe per component (:func:`fit_probes`): ``x_tr [C, N, D]``,
    ``x_te [C, M, D]``."""
    k = int(max(y_tr.max(), y_te.max())) + 1
    probe = fit_probes(x_tr, y_tr, k, l2)
    return (probe.logits(x_te.float()).argmax(-1) == y_te[None]).float().mean(1).numpy()
