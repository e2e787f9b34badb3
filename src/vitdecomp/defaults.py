"""Every default value, once: the command line's options (:mod:`vitdecomp.commands.options`), the
typed configs and the library's functions all read them from here. A leaf module that imports
nothing, so that building the command line's parser does not import torch."""

# ---------------------------------------------------------------------------- models
#: The subject decomposed when none is named: the zoo's DeiT-like model.
MODEL = "zoo:deit"
#: The CLIP model that reads the components (supplies the text space).
READER = "zoo:clip"

# ---------------------------------------------------------------------------- images
#: Seed of the default (held-out) world image set; the zoo trained on 1000/1001 (+1500 for
#: validation) and its probes use 2001/2002 — see ``vitdecomp.zoo.recipes`` / ``zoo.evaluate``.
WORLD_SEED = 3000
#: Number of generated scenes ``vitdecomp analyze`` reads by default.
DEFAULT_N_IMAGES = 2000
#: Seed of the few generated scenes the applications show or score when given no images (one no
#: analysis uses).
SHOW_SEED = 7100

# ---------------------------------------------------------------------------- store
#: Storage types of a contribution store.
STORE_DTYPES = ("float32", "float16", "bfloat16")
#: Images per decomposition batch of ``vitdecomp analyze``.
BATCH_SIZE = 64

# ---------------------------------------------------------------------------- CompAlign
#: CompAlign's orthogonality weight (1: the published setting).
DEFAULT_LAMBDA = 1.0
#: Most CompAlign steps (training is early-stopped on held-out images).
ALIGN_STEPS = 3000
#: Images per CompAlign step.
ALIGN_BATCH_SIZE = 256
#: Share of the images held out for CompAlign's early stopping.
VAL_FRACTION = 0.1

# ---------------------------------------------------------------------------- outputs
#: The report folder of ``vitdecomp analyze`` (also the analysis the applications read).
ANALYSIS_DIR = "vitdecomp-out"

# ---------------------------------------------------------------------------- commands
#: Images per batch of ``vitdecomp decompose`` (token splits of a real ViT take memory).
DECOMPOSE_BATCH_SIZE = 8

# ---------------------------------------------------------------------------- applications
#: Output folders of the applications' commands.
HEATMAP_OUT = "vitdecomp-heatmaps"
RETRIEVE_OUT = "vitdecomp-retrieval"
SEGMENT_OUT = "vitdecomp-segment"
DEBIAS_OUT = "vitdecomp-debias"
ABLATE_OUT = "vitdecomp-ablate"
FEATURES_OUT = "vitdecomp-features"
VALIDATE_OUT = "vitdecomp-validation"
#: Images ``vitdecomp retrieve`` returns.
N_RESULTS = 20
#: Random draws of the random-components controls (``debias``, ``ablate``).
N_RANDOM = 5
#: Generated scenes ``vitdecomp ablate`` reads without a folder, and its numbers of top components.
ABLATE_N_IMAGES = 1000
ABLATE_KS = (1, 2, 4, 8)
#: Images per batch of ``vitdecomp segment``'s maps, and images in its figure.
SEGMENT_BATCH_SIZE = 25
SEGMENT_SHOW = 4
#: ``vitdecomp features``: Adam steps of the SAE's training, latents whose report panel shows images
#: and token maps, images per panel.
SAE_STEPS = 2000
FEATURES_SHOW = 32
FEATURES_TOP = 4
