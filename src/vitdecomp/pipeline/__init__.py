"""The main job, ``vitdecomp analyze``, as stages over plain data driven by a typed config.

``config`` (:class:`AnalysisConfig`, from which the command line is built) · ``stages`` (one
function per stage: image source, models, store, aligner, text space, descriptions, scores, top
images, result) · ``run`` (:func:`run_analysis`: every stage in order, then the report).
"""

from vitdecomp.pipeline.config import AnalysisConfig, default_cache_dir
from vitdecomp.pipeline.run import run_analysis

__all__ = ["AnalysisConfig", "default_cache_dir", "run_analysis"]
