"""The settings of ``vitdecomp validate`` (no heavy imports: ``vitdecomp validate --help`` reads them).

Seeds of the built-in world: the aligner and the truth probes are fitted on :data:`TRAIN_SEED` (the
``vitdecomp analyze`` set); the scores were developed (variants compared, the default chosen) on
:data:`DEV_SEED` (the counterfactual pairs on the next seed); every published figure is measured on
:data:`HELD_OUT_SEED` (its pairs on the next seed), used for nothing else. Earlier rounds developed on
3001 and published on 5001. The zoo trains on seeds 1000, 1001, 1500 and fits its own probes on
2001/2002.
"""

from __future__ import annotations

from vitdecomp.defaults import WORLD_SEED
from vitdecomp.scores.registry import score_names

MODELS = ("zoo:deit", "zoo:simclr", "zoo:swin", "zoo:maxvit", "zoo:planted")
TRAIN_SEED = WORLD_SEED
DEV_SEED = 9100
HELD_OUT_SEED = 6001
#: The counterfactual pairs are drawn from the world seed after the scored scenes' (other images).
PAIR_SEED_OFFSET = 1
N_TRAIN = 2000
N_TEST = 1000
#: Counterfactual pairs per attribute of the flow truth (its split-half Spearman is 0.98-1.00 on the
#: development seed for deit, dino, swin and maxvit).
N_PAIRS = 512
#: The scores compared: every registered score (see :mod:`vitdecomp.scores.registry`).
SCORES = score_names()
#: The truths every score is checked against (see :mod:`vitdecomp.evaluation.truths`).
TRUTHS = ("flow", "response", "causal_mean", "causal_resample", "zero_shot_causal", "probe", "specificity")
#: Targets: Spearman of the default score with the counterfactual flow share and with the causal
#: truth, top-k precision on planted heads.
TARGET_FLOW = 0.9
TARGET_SPEARMAN = 0.8
TARGET_PLANTED = 0.9
