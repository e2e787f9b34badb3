"""The settings of ``vitdecomp validate`` (no heavy imports: ``vitdecomp validate --help`` reads them).

Seeds of the built-in world: the aligner and the truth probes are fitted on :data:`TRAIN_SEED` (the
``vitdecomp analyze`` set); the scores were developed (variants compared, the default chosen) on
:data:`DEV_SEED`; every published figure is measured on :data:`HELD_OUT_SEED`, used for nothing else.
The zoo trains on seeds 1000, 1001, 1500 and fits its own probes on 2001/2002.
"""

from __future__ import annotations

from vitdecomp.defaults import WORLD_SEED
from vitdecomp.scores.registry import score_names

MODELS = ("zoo:deit", "zoo:simclr", "zoo:swin", "zoo:maxvit", "zoo:planted")
TRAIN_SEED = WORLD_SEED
DEV_SEED = 3001
HELD_OUT_SEED = 5001
N_TRAIN = 2000
N_TEST = 1000
#: The scores compared: every registered score (see :mod:`vitdecomp.scores.registry`).
SCORES = score_names()
#: The truths every score is checked against (see :mod:`vitdecomp.evaluation.truths`).
TRUTHS = ("causal_mean", "causal_resample", "zero_shot_causal", "probe", "specificity")
#: Targets: Spearman of the default score with the causal truth, top-k precision on planted heads.
TARGET_SPEARMAN = 0.8
TARGET_PLANTED = 0.9
