"""What keeps a report honest: components that are constant over the images (rank 1), and the
warnings a run's figures need (few images, a weak alignment, an aligner from another image set,
random weights, a model outside the zoo read through the zoo's toy CLIP).

Thresholds, documented here and in ``results.json`` (``constant``, ``warnings``):

* :data:`RANK1_THRESHOLD` — a component whose second singular value over the images is below this
  share of its first is rank 1: every image gets the same direction, only scaled (``init``, the
  attention biases through a frozen norm scale). It has no variation to describe, so it gets
  neither descriptions nor top images.
* :data:`ALIGNMENT_FLOOR` — below this cosine between the aligned whole and the reader's own
  embedding *on the analysed images*, descriptions and scores are not to be trusted.
* :data:`MIN_IMAGES` — fewer images than this make every correlation noisy.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vitdecomp.results import AnalysisResult
from vitdecomp.store import Rows

RANK1_THRESHOLD = 1e-4
ALIGNMENT_FLOOR = 0.5
MIN_IMAGES = 100
#: Images the rank test reads (the first ones): a component of higher rank shows in any of them.
RANK_SAMPLE = 256


#: Components whose singular values one batched call reads (:func:`rank_one_components`).
RANK_GROUP = 16


@torch.no_grad()
def rank_one_components(
    rows: Rows, threshold: float = RANK1_THRESHOLD, sample: int = RANK_SAMPLE, progress: bool = False
) -> dict[str, float]:
    """``{label: s2 / s1}`` of the components whose relative second singular value over the first
    ``sample`` images is below ``threshold`` (an all-zero component counts, with 0).

    Screened :data:`RANK_GROUP` components at a time from their Gram matrices ``[c, m, m]`` (``m`` the
    smaller of images and width; eigenvalues ``s^2``, one batched call, ~10x cheaper than an SVD of
    each ``[n, D]``); the few that come near the threshold are read again by an exact SVD, so the
    labels and ratios returned are the SVD's. ``progress``: a bar over the components."""
    out: dict[str, float] = {}
    labels = rows.labels or [str(i) for i in range(rows.shapes["contributions"][0])]
    bar = tqdm(total=len(labels), desc="rank-1 test", unit="comp", leave=False, disable=not progress)
    for g in range(0, len(labels), RANK_GROUP):
        x = torch.stack([rows.component(c, stop=sample) for c in range(g, min(g + RANK_GROUP, len(labels)))])
        for c, ratio in zip(range(g, g + len(x)), _gram_ratios(x.double()).tolist(), strict=True):
            if ratio < 2 * threshold:  # near or below: the exact SVD decides
                ratio = _svd_ratio(x[c - g].double())
            if ratio < threshold:
                out[labels[c]] = ratio
        bar.update(len(x))
    bar.close()
    return out


def _gram_ratios(x: torch.Tensor) -> torch.Tensor:
    """``[c]``: ``s2 / s1`` of each ``x [c, n, D]`` from its Gram matrix (0 where ``s1 = 0`` or
    ``n = 1``); accurate to ~``sqrt(n eps)``, far below any threshold it screens."""
    if x.shape[1] < 2:
        return x.new_zeros(x.shape[0])
    gram = x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x
    s2 = torch.linalg.svdvals(gram)  # [c, m]: squared singular values, descending
    return torch.where(s2[:, 0] > 0, (s2[:, 1].clamp_min(0) / s2[:, 0].clamp_min(1e-300)).sqrt(), 0.0)


def _svd_ratio(x: torch.Tensor) -> float:
    """``s2 / s1`` of ``x [n, D]`` by an SVD (0 when ``s1 = 0`` or ``n = 1``)."""
    s = torch.linalg.svdvals(x) if x.shape[0] > 1 else torch.zeros(2, dtype=x.dtype)
    return float(s[1] / s[0]) if len(s) > 1 and s[0] > 0 else 0.0


def run_warnings(r: AnalysisResult, models: object, *, random_init: bool, seed: int) -> list[str]:
    """Why this run's figures may mean little, one sentence each."""
    out = []
    if random_init:
        out.append(
            f"random weights (--random-init, seed {seed}) for the subject {r.model.name} and the reader "
            f"{r.reader.name}: the components and their descriptions mean nothing (smoke test only)"
        )
    if r.images.n < MIN_IMAGES:
        out.append(f"only {r.images.n} images (fewer than {MIN_IMAGES}): every score and description is noisy")
    a = r.alignment
    cos = a.cosine_all_images
    if a.state != "identity" and cos is not None and cos < ALIGNMENT_FLOOR:
        out.append(
            f"the aligned components reach a cosine of only {cos:.3f} to {r.reader.name}'s embedding on these "
            f"images (floor {ALIGNMENT_FLOOR}): descriptions and scores are unreliable"
        )
    if r.reader.name.startswith("zoo:") and not r.model.name.startswith("zoo:"):
        held = a.metrics.get("val_cosine")
        cosine = f" (the aligner's held-out cosine: {held:.2f})" if isinstance(held, (int, float)) else ""
        out.append(
            f"{r.model.name} is read through {r.reader.name}, the zoo's small CLIP trained only on the generated "
            f"world{cosine}: its text space cannot name what a real model's parts carry; read it with a real "
            "CLIP (--clip open_clip:ViT-B-16/laion2b_s34b_b88k, --clip-checkpoint FILE offline)"
        )
    trained_on = a.metrics.get("trained_on")
    if a.state in ("given", "loaded") and trained_on and trained_on != r.images.key:
        out.append(f"the aligner was trained on another image set ({trained_on}), not on these images")
    if r.images.skipped:
        out.append(f"{len(r.images.skipped)} unreadable file(s) were skipped (listed in results.json: images.skipped)")
    absent = r.absent_features()
    if absent:
        names = ", ".join(repr(f) for f in absent)
        out.append(
            f"feature(s) {names}: the images do not show them (their zero-shot readings separate the images no "
            "more than random groups of real texts do; results.json: presence), so no component is marked "
            "significant for them"
        )
    if a.state == "untrained":
        out.append("the aligner is untrained (--align-steps 0): the mapping into CLIP space is its initial value")
    return out
