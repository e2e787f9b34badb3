"""The main job, ``vitdecomp analyze``, as stages over plain data driven by a typed config.

``config`` (:class:`AnalysisConfig`, from which the command line is built) · ``stages`` (one
function per stage: image source, models, store, aligner, text space, descriptions, scores, top
images, result) · ``run`` (:func:`run_analysis`: every stage in order, then the report) · ``cli``
(the ``analyze`` and ``decompose`` subcommands). Names are imported on first use, so that the
command line's parser does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnalysisConfig": "vitdecomp.pipeline.config",
    "default_cache_dir": "vitdecomp.pipeline.config",
    "run_analysis": "vitdecomp.pipeline.run",
}
__all__ = ["AnalysisConfig", "default_cache_dir", "run_analysis"]

if TYPE_CHECKING:
    from vitdecomp.pipeline.config import AnalysisConfig, default_cache_dir
    from vitdecomp.pipeline.run import run_analysis


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitdecomp.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
