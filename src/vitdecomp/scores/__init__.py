"""Which components matter for a feature: the scores, one record each, and what computes them.

``registry`` (:class:`Score`, :data:`SCORES`, :func:`register_score`, :data:`DEFAULT_SCORE`: the
one place a score is declared) · ``functions`` (the built-in scores' math) · ``tables``
(:func:`score_features`: every component x feature in one pass over the rows) · ``flow`` (the
default score's sufficient statistics and math) · ``confidence`` (bootstrap intervals and a null) ·
``presence`` (is a feature in the images at all) · ``features`` (feature sets as lists of
descriptions).

Names are imported on first use (PEP 562), so that the command line's parser can read the registry
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_SCORE": "registry",
    "SCORES": "registry",
    "Score": "registry",
    "analysis_scores": "registry",
    "get_score": "registry",
    "register_score": "registry",
    "score_about": "registry",
    "score_names": "registry",
    "unregister_score": "registry",
    "builtin_feature_sets": "features",
    "embed_features": "features",
    "load_features": "features",
    "ABLATION_SCALE": "functions",
    "Projected": "functions",
    "feature_basis": "functions",
    "fit_text_probes": "functions",
    "score_ablation": "functions",
    "score_invariant": "functions",
    "score_paper": "functions",
    "score_share": "functions",
    "score_text_probe": "functions",
    "Projections": "tables",
    "ScoreTable": "tables",
    "project_features": "tables",
    "score": "tables",
    "score_features": "tables",
    "ValueSums": "flow",
    "flow_share": "flow",
    "FeaturePresence": "presence",
    "feature_presence": "presence",
    "Resampling": "confidence",
    "ScoreConfidence": "confidence",
    "null_features": "confidence",
    "score_confidence": "confidence",
}
__all__ = [
    "ABLATION_SCALE",
    "DEFAULT_SCORE",
    "SCORES",
    "FeaturePresence",
    "Projected",
    "Projections",
    "Resampling",
    "Score",
    "ScoreConfidence",
    "ScoreTable",
    "ValueSums",
    "analysis_scores",
    "builtin_feature_sets",
    "embed_features",
    "feature_basis",
    "feature_presence",
    "fit_text_probes",
    "flow_share",
    "get_score",
    "load_features",
    "null_features",
    "project_features",
    "register_score",
    "score",
    "score_ablation",
    "score_about",
    "score_confidence",
    "score_features",
    "score_invariant",
    "score_names",
    "score_paper",
    "score_share",
    "score_text_probe",
    "unregister_score",
]

if TYPE_CHECKING:
    from vitdecomp.scores.confidence import Resampling, ScoreConfidence, null_features, score_confidence
    from vitdecomp.scores.features import builtin_feature_sets, embed_features, load_features
    from vitdecomp.scores.flow import ValueSums, flow_share
    from vitdecomp.scores.functions import (
        ABLATION_SCALE,
        Projected,
        feature_basis,
        fit_text_probes,
        score_ablation,
        score_invariant,
        score_paper,
        score_share,
        score_text_probe,
    )
    from vitdecomp.scores.presence import FeaturePresence, feature_presence
    from vitdecomp.scores.registry import (
        DEFAULT_SCORE,
        SCORES,
        Score,
        analysis_scores,
        get_score,
        register_score,
        score_about,
        score_names,
        unregister_score,
    )
    from vitdecomp.scores.tables import Projections, ScoreTable, project_features, score, score_features


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitdecomp.scores' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vitdecomp.scores.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
