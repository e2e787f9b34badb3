"""The wrong-prompt test on the built-in world for every map method: ``python -m
vitdecomp.commands.evaluate_apps specificity --report DIR [--n-images 200] [--seed S] [--json FILE]``.

Two halves, on the same fresh scenes:

* the decomposition's heatmaps (text maps through the aligner, every model):
  :func:`vitdecomp.evaluation.app_heatmaps.heatmap_scores`, right and wrong value texts;
* segmentation (models with the zoo's multi-attribute heads, whose logit rows are the classes): every
  method of ``vitdecomp segment`` (decomposition, GradCAM, Chefer et al.) explaining the model's own
  predicted value (``predicted``) and a value it does not predict (``wrong``, seeded), each read against
  the image's expected alternative (``--contrast expected``, the command's default) or as the logit
  alone (``none``, as the published methods explain a class). Each cell equals ``vitdecomp segment
  --model M --n-images N --seed S --feature F --target T --contrast C``.
"""

from __future__ import annotations

from typing import Any

import torch

from vitdecomp.apps.analysis import Analysis
from vitdecomp.apps.masks import world_set
from vitdecomp.apps.segment import CONTRASTS, Explained, default_methods, segment
from vitdecomp.evaluation.app_heatmaps import EVAL_SEED, heatmap_scores

#: The logit blocks the segmentation half explains.
SEGMENT_FEATURES = ("color", "shape")


def segment_scores(
    model: Any, n: int = 200, seed: int = EVAL_SEED, features: tuple[str, ...] = SEGMENT_FEATURES
) -> dict:
    """Every method's scores per ``"<feature> <contrast> <target>"`` (module text); ``{}`` for a model
    without the zoo's multi-attribute heads."""
    if not getattr(model, "attribute_heads", None):
        return {}
    data = world_set(n, seed)
    out: dict[str, dict] = {}
    for f in features:
        for contrast in CONTRASTS:
            for target in ("predicted", "wrong"):
                with torch.enable_grad():  # GradCAM needs gradients (the command turns them off)
                    res = segment(
                        model,
                        data,
                        explained=Explained(target, f, contrast, seed),
                        methods=default_methods(),
                        show=1,
                        progress=False,
                    )
                out[f"{f} {contrast} {target}"] = {
                    m.name: None if m.metrics is None else m.metrics.to_dict() | {"maps_per_s": m.maps_per_s}
                    for m in res.methods
                }
    return out


def specificity(analysis: Analysis, n: int = 200, seed: int = EVAL_SEED) -> dict:
    """Both halves (module text) for one analysis' subject model."""
    out = heatmap_scores(analysis, n, seed)
    out["segment"] = segment_scores(analysis.subject, n, seed)
    return out
