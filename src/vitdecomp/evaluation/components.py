"""Which components an agreement figure is measured over: the *direct branches* (attention heads,
MLPs, convolutional branches) that vary over the images.

Constants (``init`` of a model without position-dependent input, every bias, every norm's beta)
are the same vector for every image: their contribution matrix ``[N, D]`` has rank 1 (its second
singular value is ~1e-7 of the first in float32). They sit at the bottom of every ranking, score and
truth alike, and inflate any rank correlation that includes them, so they are left out of every
figure. A component is *constant* when its relative second singular value ``s_2 / s_1`` (of the
uncentred ``[N, D]`` matrix over the images) is below :data:`CONSTANT_RTOL`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from vitdecomp.pipeline.honesty import RANK1_THRESHOLD

#: ``s_2 / s_1`` below this: the component is the same vector for every image (float32 round-off
#: puts true constants near 1e-7). The report's threshold for rank-1 components, shared.
CONSTANT_RTOL = RANK1_THRESHOLD

_HEAD = re.compile(r"(^|\.)H\d+$")


def is_branch(label: str) -> bool:
    """An attention head, a whole attention branch, an MLP or a convolutional branch (not ``init``,
    a bias, a norm's beta or an attention pool's terms)."""
    if label.startswith("pool_"):
        return False
    return bool(_HEAD.search(label)) or label.rsplit(".", 1)[-1] in ("mlp", "conv", "attn")


@torch.no_grad()
def relative_second_singular_value(contributions: torch.Tensor, max_images: int = 2000) -> np.ndarray:
    """``s_2 / s_1`` of each component's uncentred ``[N, D]`` matrix; ``contributions [N, C, D]`` ->
    ``[C]`` (0 for a component that is zero on every image)."""
    x = contributions[:max_images].double().transpose(0, 1)  # [C, N, D]
    s = torch.linalg.svdvals(x)  # [C, min(N, D)]
    if s.shape[1] < 2:
        return np.zeros(x.shape[0])
    return (s[:, 1] / s[:, 0].clamp_min(1e-300)).numpy()


def evaluated_components(labels: Sequence[str], contributions: torch.Tensor, rtol: float = CONSTANT_RTOL) -> np.ndarray:
    """Indices of the components every agreement figure is measured over: direct branches
    (:func:`is_branch`) that are not constant (:func:`relative_second_singular_value` >= ``rtol``)."""
    rel = relative_second_singular_value(contributions)
    keep = [i for i, lab in enumerate(labels) if is_branch(lab) and rel[i] >= rtol]
    return np.asarray(keep, dtype=np.int64)
