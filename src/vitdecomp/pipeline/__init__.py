"""The main job's stages over plain data, driven by typed configs.

``config`` (:class:`AnalysisConfig`, :class:`DecomposeConfig`) · ``model_pair`` (the subject and the
reader) · ``fill`` (the store stage, filled in this process) · ``ray_fill`` (or by Ray actors) ·
``stages`` (aligner, text space, descriptions, scores, top images, the result) · ``sequence`` (the
stages in order) · ``honesty`` (rank-1 components and the run's warnings) · ``decompose_set``
(``vitdecomp decompose`` as a function). The whole job with its report is
:func:`vitdecomp.analyze.run_analysis`. Names are imported on first use, so that the command line's
parser does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnalysisConfig": "vitdecomp.pipeline.config",
    "DecomposeConfig": "vitdecomp.pipeline.config",
    "default_cache_dir": "vitdecomp.pipeline.config",
}
__all__ = ["AnalysisConfig", "DecomposeConfig", "default_cache_dir"]

if TYPE_CHECKING:
    from vitdecomp.pipeline.config import AnalysisConfig, DecomposeConfig, default_cache_dir


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitdecomp.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
