"""The scores, one record each: :class:`Score` and the registry :data:`SCORES`.

A record says everything the rest of the package needs to know about a score: its ``name`` (the key
in ``results.json``), the ``kind`` of directions it projects the aligned components on (``"qr"``: the
QR basis of the feature's descriptions in their order; ``"span"``: any orthonormal basis of their
span; ``"text"``: the unit description embeddings themselves), whether it is a mean over images of a
per-image effect, the function that computes it, a one-line explanation (the report's "About these
numbers") and whether ``vitdecomp analyze`` computes it. The command line's choices
(``debias --score``, ``validate --scores``), the validation settings, the scores an analysis
computes and the report's explanations are all read from here.

Adding a score is one record::

    from vitdecomp.scores import Score, register_score

    def my_score(p):                      # p: vitdecomp.scores.Projected
        u, whole = p.u, p.whole           # [N, C, r] and [N, r] on the feature's directions (float64)
        return (u - u.mean(0)).square().sum((0, 2))          # [C]

    register_score(Score("mine", kind="span", about="variance in the feature's span", function=my_score))

This module imports nothing heavy (the command line's parser reads it): a function may be given as
``"module:function"``, imported on first use, as the built-in ones are (their math is in
:mod:`vitdecomp.scores.functions`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The directions a score projects on (see the module text).
KINDS = ("qr", "span", "text")


@dataclass(frozen=True)
class Score:
    """One score of every component for a feature.

    ``function(p) -> [C]`` (or ``[N, C]`` per image when ``per_image``; the score is then the mean
    over images and the bootstrap resamples the per-image effects), where ``p`` is a
    :class:`vitdecomp.scores.Projected`. ``resample(p, w) -> [B, C]``: the score under image weights
    ``w [B, N]`` (bootstrap counts), for a score that is not per image (without one the bootstrap
    recomputes ``function`` on each resample). ``needs_probe``: ``p.probe`` must hold the feature's
    text-taught probe readout. ``needs_values``: ``p.values`` must hold the feature's per-value sums
    of the subject's contributions (:class:`vitdecomp.scores.flow.ValueSums`) and ``p.value_batches``
    the rows again with each image's value. ``analyze``: computed by ``vitdecomp analyze``
    (results.json, confidence, report). ``stream(feature_emb, n) -> StreamedScore``: the score's
    sufficient statistics, kept batch by batch over one or two passes of the rows, so that scoring ``n``
    images takes memory flat in ``n`` (:mod:`vitdecomp.scores.streamed`; without one, the score reads
    every image's projections ``[N, C, r]`` held in memory). ``projections``: the function reads
    ``p.u`` / ``p.whole`` (``False``: only its other statistics, e.g. ``flow``'s per-value sums; the
    confidence stage then holds no projections for it). Functions may be ``"module:function"``
    strings, imported on first use.
    """

    name: str
    kind: str
    about: str
    function: Callable[..., Any] | str
    per_image: bool = False
    resample: Callable[..., Any] | str | None = None
    needs_probe: bool = False
    needs_values: bool = False
    analyze: bool = True
    stream: Callable[..., Any] | str | None = None
    projections: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"score {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")

    def compute(self, p: Any) -> Any:
        """The score ``[C]`` (per-image scores averaged over the images)."""
        out = resolve(self.function)(p)
        return out.mean(0) if self.per_image else out

    def per_image_effects(self, p: Any) -> Any:
        """``[N, C]``: the per-image effects of a per-image score."""
        if not self.per_image:
            raise ValueError(f"score {self.name!r} is not a mean over images")
        return resolve(self.function)(p)

    def resampled(self, p: Any, weights: Any) -> Any:
        """``[B, C]``: the score under image weights ``[B, N]`` (``None`` when the record has no
        ``resample`` and is not per image)."""
        if self.per_image:
            effects = self.per_image_effects(p)
            return weights.to(effects.dtype) @ effects / effects.shape[0]
        return None if self.resample is None else resolve(self.resample)(p, weights)


def resolve(fn: Callable[..., Any] | str) -> Callable[..., Any]:
    """``fn`` itself, or the function a ``"module:function"`` string names (imported now)."""
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


#: The registered scores, in the order they are computed, reported and offered.
SCORES: dict[str, Score] = {}
#: The score ``vitdecomp analyze`` ranks by and shows first (``results.json``: ``ranked_by``).
DEFAULT_SCORE = "flow"


def register_score(score: Score, *, replace: bool = False) -> Score:
    """Add ``score`` to :data:`SCORES` (a name already taken raises unless ``replace``)."""
    if score.name in SCORES and not replace:
        raise ValueError(f"a score named {score.name!r} is already registered")
    SCORES[score.name] = score
    return score


def unregister_score(name: str) -> None:
    """Remove a score added by :func:`register_score` (tests)."""
    SCORES.pop(name, None)


def get_score(name: str) -> Score:
    """The record of ``name`` (``ValueError`` naming the registered ones otherwise)."""
    if name not in SCORES:
        raise ValueError(f"method must be one of {score_names()}, not {name!r}")
    return SCORES[name]


def score_names() -> tuple[str, ...]:
    """Every registered score."""
    return tuple(SCORES)


def analysis_scores() -> tuple[str, ...]:
    """The scores ``vitdecomp analyze`` computes."""
    return tuple(s.name for s in SCORES.values() if s.analyze)


def score_about(name: str) -> str:
    """The one-line explanation of ``name`` ("" for a score no longer registered)."""
    return SCORES[name].about if name in SCORES else ""


_F = "vitdecomp.scores.functions"
_S = "vitdecomp.scores.streamed"
register_score(
    Score(
        "paper",
        kind="qr",
        about="the published score: the mean over a QR basis of the feature's descriptions of the correlation "
        "(over images) between the component and the whole along each direction; depends on the descriptions' order",
        function=f"{_F}:paper",
        stream=f"{_S}:paper",
        resample=f"{_F}:paper_resampled",
    )
)
register_score(
    Score(
        "invariant",
        kind="span",
        about="the correlation of the component's variation with the whole's, pooled over the whole feature "
        "subspace: the same for any order or mixing of the descriptions",
        function=f"{_F}:invariant",
        stream=f"{_S}:invariant",
        resample=f"{_F}:invariant_resampled",
    )
)
register_score(
    Score(
        "share",
        kind="span",
        about="the component's share of the whole's variance in the feature subspace (sums to 1 over the "
        "components; not scale-free)",
        function=f"{_F}:share",
        stream=f"{_S}:share",
        resample=f"{_F}:share_resampled",
        analyze=False,
    )
)
register_score(
    Score(
        "ablation",
        kind="text",
        about="how much mean-ablating the component changes the feature's zero-shot reading of the aligned whole "
        "(mean KL divergence over the descriptions, label-free)",
        function=f"{_F}:ablation",
        stream=f"{_S}:ablation",
        per_image=True,
    )
)
register_score(
    Score(
        "text_probe",
        kind="text",
        about="the rise of a text-taught probe's loss on the subject's own representation when the component is "
        "mean-ablated, as a share of every component's rise (label-free; agrees best with the mean-ablation causal "
        "truth, docs/validation.md)",
        function=f"{_F}:text_probe",
        stream=f"{_S}:text_probe",
        per_image=True,
        needs_probe=True,
    )
)
register_score(
    Score(
        "flow",
        kind="text",
        about="where the feature flows: every image labelled by the reader's zero-shot reading of the feature, each "
        "component's mean contribution per value in the subject's own space, and its share of the whole's "
        "between-value variation (sums to 1; signed: positive components carry the feature, negative ones "
        "suppress it). Label-free, no aligner; the default: it agrees with the counterfactual flow share "
        "(docs/validation.md)",
        function=f"{_F}:flow",
        stream=f"{_S}:flow",
        projections=False,
        resample=f"{_F}:flow_resampled",
        needs_values=True,
    )
)
