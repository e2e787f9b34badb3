"""The two models of an analysis, loaded: the *subject* (the model decomposed) and the *reader*
(the CLIP model whose text space names its parts): :class:`Models`, :func:`load_models`, and
:func:`load_model_for`, one meaning of ``random_init`` for every model name."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vitdecomp.defaults import READER
from vitdecomp.errors import UsageError, WeightsUnavailableError
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.models.loading import load_model
from vitdecomp.pipeline.config import AnalysisConfig


def load_model_for(
    name: str,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str = "cpu",
    seed: int | None = None,
) -> LoadedModel:
    """:func:`vitdecomp.load_model` with one meaning of ``random_init`` for every name: random
    weights, drawn from ``seed`` when given (its ``weights_id`` then ends in ``:seed=<seed>``, so
    caches keep draws apart; ``None``: torch's current random state, the id without a seed); a zoo
    model given a ``checkpoint`` loads that checkpoint."""
    seeded = random_init and checkpoint is None and seed is not None
    with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(seed)
        if name.startswith("zoo:"):
            kw = {"random_init": True} if random_init and checkpoint is None else {}
            loaded = load_model(name, checkpoint=checkpoint, device=device, **kw)
        else:
            loaded = load_model(name, pretrained=not random_init, checkpoint=checkpoint, device=device)
    if seeded:
        loaded.weights_id = f"{loaded.weights_id}:seed={seed}"
    return loaded


@dataclass
class Models:
    """The subject (the model decomposed) and the reader (the CLIP model that reads its parts)."""

    subject: LoadedModel
    reader: LoadedModel

    @property
    def identity(self) -> bool:
        """The subject is the reader: its contributions already live in the reader's image space."""
        s, r = self.subject, self.reader
        return r is s or (s.is_clip and s.weights_id == r.weights_id)


def load_models(
    model: str,
    reader: str | None = READER,
    *,
    checkpoint: str | Path | None = None,
    reader_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Models:
    """Load the subject and the reader (``reader=None`` or the subject's own name: the subject reads
    itself and must be a CLIP model); ``random_init`` weights are drawn from ``seed`` (the reader's
    from ``seed + 1``). The reader is loaded first: a reader that is not a CLIP fails before the
    subject is loaded."""
    if reader is None or (reader == model and reader_checkpoint in (None, checkpoint)):
        subject = load_model_for(model, checkpoint, random_init, device, seed)
        if not subject.is_clip:
            raise UsageError(f"{model} is not a CLIP model: give a CLIP model (--clip) to read it with text")
        return Models(subject, subject)
    try:
        loaded = load_model_for(reader, reader_checkpoint, random_init, device, seed + 1)
    except WeightsUnavailableError as err:  # the reader's weights file goes with --clip-checkpoint
        text = (
            str(err).replace("--checkpoint FILE", "--clip-checkpoint FILE").replace("checkpoint=", "reader_checkpoint=")
        )
        raise WeightsUnavailableError(text) from err
    if not loaded.is_clip:
        raise UsageError(f"--clip {reader} is not a CLIP model (it has no text tower): give a CLIP, e.g. zoo:clip")
    return Models(load_model_for(model, checkpoint, random_init, device, seed), loaded)


def configured_models(cfg: AnalysisConfig, device: str) -> Models:
    """The subject and reader that ``cfg`` names, on ``device``."""
    return load_models(
        cfg.model,
        cfg.reader,
        checkpoint=cfg.checkpoint,
        reader_checkpoint=cfg.reader_checkpoint,
        random_init=cfg.random_init,
        device=device,
        seed=cfg.seed,
    )
