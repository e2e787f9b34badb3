"""What every validation of a model on the built-in world starts from: the subject and reader, the
stores of a training and a held-out set of scenes, the aligner fitted on the training set, and the
world's features and class texts embedded by the reader (:func:`prepare`, for a :class:`WorldRun`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitdecomp.aligner_cache import AlignOptions, CachedAligner, get_aligner
from vitdecomp.defaults import ALIGN_STEPS, DEFAULT_N_IMAGES, READER, WORLD_SEED
from vitdecomp.imageset import ImageSource, world_source
from vitdecomp.pipeline.config import default_cache_dir
from vitdecomp.pipeline.fill import FillOptions, build_store, readable_rows
from vitdecomp.pipeline.model_pair import Models, load_model_for
from vitdecomp.scores import embed_features, load_features
from vitdecomp.store import Rows
from vitdecomp.text import WORLD_TEMPLATES, TextEncoder, world_class_embeddings


@dataclass(kw_only=True)
class WorldRun:
    """One model's validation run: the subject ``name`` read through ``reader`` (``random_init``: the
    subject's weights random; ``random_reader``: the reader's too), the aligner fitted on ``n_train``
    scenes of the analysis seed, the figures on ``n_test`` scenes of ``test_seed``; caches under
    ``cache_dir``; CompAlign's ``align_steps``."""

    name: str
    reader: str = READER
    n_train: int = DEFAULT_N_IMAGES
    n_test: int = 1000
    train_seed: int = WORLD_SEED
    test_seed: int = WORLD_SEED + 1
    random_init: bool = False
    random_reader: bool = False
    cache_dir: str | Path | None = None
    align_steps: int = ALIGN_STEPS
    device: str = "cpu"
    progress: bool = True
    log: Callable[..., Any] = print


@dataclass
class Prepared:
    """The models, the two image sets and their rows, the aligner, the encoder, the world's feature
    embeddings ``{feature: [K, d_clip]}`` and class texts ``{attribute: [K, d_clip]}``."""

    models: Models
    train_source: ImageSource
    test_source: ImageSource
    train: Rows
    test: Rows
    aligned: CachedAligner
    encoder: TextEncoder
    features: dict[str, torch.Tensor]
    classes: dict[str, torch.Tensor]


def prepare(run: WorldRun) -> Prepared:
    """Load, store, align and embed what ``run`` names (reusing every cache under ``run.cache_dir``)."""
    cache = Path(run.cache_dir) if run.cache_dir is not None else default_cache_dir()
    device = run.device
    models = Models(
        load_model_for(run.name, None, run.random_init, device),
        load_model_for(run.reader, None, run.random_reader, device),
    )
    src_tr, src_te = world_source(run.n_train, seed=run.train_seed), world_source(run.n_test, seed=run.test_seed)
    train, test = (
        readable_rows(build_store(models, s, cache / "stores", FillOptions(device=device, progress=run.progress)).store)
        for s in (src_tr, src_te)
    )
    options = AlignOptions(max_steps=run.align_steps)
    aligned = get_aligner(train, cache / "aligners", options, device=device, progress=run.progress, log=run.log)
    encoder = TextEncoder.from_loaded(models.reader, cache_dir=cache / "text", device=device)
    features = embed_features(lambda t: encoder.encode(t, WORLD_TEMPLATES), load_features("world"))
    classes = world_class_embeddings(lambda texts: encoder.encode(texts, ("{}",)))
    return Prepared(models, src_tr, src_te, train, test, aligned, encoder, features, classes)
