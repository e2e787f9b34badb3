"""Default values that the command line shows in ``--help``: a leaf module that imports nothing
heavy, so that building the parser does not import torch."""

#: Seed of the default (held-out) world image set; the zoo trained on 1000/1001 (+1500 for
#: validation) and its probes use 2001/2002 — see ``vitdecomp.zoo.recipes`` / ``zoo.evaluate``.
WORLD_SEED = 3000
#: Number of generated scenes ``vitdecomp analyze`` reads by default.
DEFAULT_N_IMAGES = 2000
#: Storage types of a contribution store.
STORE_DTYPES = ("float32", "float16", "bfloat16")
#: CompAlign's orthogonality weight (1: the published setting); equal to ``vitdecomp.align.DEFAULT_LAMBDA``.
DEFAULT_LAMBDA = 1.0
