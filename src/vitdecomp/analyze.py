"""``vitdecomp analyze``: decompose, store, align, describe and score every component; write a report.

One call of :func:`run_analysis` runs the whole method on one image set::

    images ─▶ decompose (subject model) ─┐
           ─▶ reader's image embedding ──┴▶ store (keyed, resumable, on disk)
    store ─▶ CompAlign (trained once and cached; identity when the subject is the reader)
          ─▶ TextSpan descriptions per component (vocabulary embedded by the reader's text tower, cached)
          ─▶ scores of every component for every feature ("paper" and the rotation-invariant score)
          ─▶ report folder: results.json + index.html (self-contained)

The *reader* is the CLIP model whose text space names the components (``--clip``). With no options
it runs offline on the built-in default: the zoo's DeiT-like model read through the zoo's CLIP, on
:data:`~vitdecomp.imageset.DEFAULT_N_IMAGES` generated scenes of the built-in world drawn from
:data:`~vitdecomp.imageset.WORLD_SEED` — a seed none of the zoo's training, validation or probe sets
used (they use 1000, 1001, 1500 and 2001, 2002). With ``images=DIR`` it reads an image folder and
scores the paper's features with the general vocabulary::

    from vitdecomp.analyze import AnalysisConfig, run_analysis
    result = run_analysis(AnalysisConfig(model="zoo:dino", n_images=500, out="out"))
    result.scores["invariant"]["color"]        # {component label: score}

This module is the public entry point; the work is done in :mod:`vitdecomp.pipeline` (the typed
config the command line is built from, one function per stage, the runner) and
:mod:`vitdecomp.report` (the typed result whose serialisation is ``results.json``, the HTML page).
Caches live under ``cache_dir`` (default ``$VITDECOMP_CACHE`` or ``~/.cache/vitdecomp``); see
:mod:`vitdecomp.pipeline.stages`.
"""

from vitdecomp.pipeline import AnalysisConfig, default_cache_dir, run_analysis
from vitdecomp.report import AnalysisResult

__all__ = ["AnalysisConfig", "AnalysisResult", "default_cache_dir", "run_analysis"]
