"""Load timm / open_clip / zoo models with their own preprocessing, offline-friendly.

Names:
  ``deit_base_patch16_224``, ``vit_base_patch16_224.dino``, ... timm names (kwargs go to
      ``timm.create_model``)
  ``open_clip:ViT-B-16/laion2b_s34b_b88k`` (or ``open_clip:ViT-B-16`` with ``pretrained=False``)
  ``zoo:deit``, ``zoo:clip``, ...           the models shipped with vitdecomp
A local checkpoint (safetensors, or a torch file read with ``weights_only``) is given with
``checkpoint=PATH`` and is loaded through timm's / open_clip's own pretrained-loading code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitdecomp.errors import CheckpointError, WeightsUnavailableError
from vitdecomp.models.loaded import LoadedModel, file_digest
from vitdecomp.zoo.hub import load_zoo_model

__all__ = ["OPEN_CLIP_PREFIX", "ZOO_PREFIX", "LoadedModel", "file_digest", "load_model"]

OPEN_CLIP_PREFIX = "open_clip:"
ZOO_PREFIX = "zoo:"


def load_model(
    name: str,
    pretrained: bool = True,
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> LoadedModel:
    """Create a model by name, load its weights, and return it with its preprocessing.

    ``pretrained=False`` gives random-init weights; ``checkpoint`` loads a local file instead of
    the hub. Raises :class:`WeightsUnavailableError` (with instructions) when the weights cannot be
    had offline and :class:`CheckpointError` when a checkpoint does not fit the architecture.
    """
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint file not found: {checkpoint}")
    loader, spec = _loader_for(name)
    loaded = loader(spec, pretrained, checkpoint, **kwargs)
    loaded.model.eval()
    return loaded.to(device)


def _loader_for(name: str) -> tuple[Callable[..., LoadedModel], str]:
    """The loader of a name's scheme (``zoo:``, ``open_clip:``; timm for a plain name) and the name
    without its prefix."""
    for prefix, loader in _SCHEMES.items():
        if name.startswith(prefix):
            return loader, name[len(prefix) :]
    return _load_timm, name


def _load_zoo(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    """A shipped zoo model (``pretrained`` is not used: the zoo always loads its weights)."""
    return load_zoo_model(spec, checkpoint=checkpoint, **kwargs)


def _weights_id(name: str, pretrained: bool, checkpoint: Path | None, tag: str | None = None) -> str:
    if checkpoint is not None:
        return f"{name}@file:{file_digest(checkpoint)}"
    if not pretrained:
        return f"{name}@random-init"
    return f"{name}@{tag}" if tag else f"{name}@pretrained"


def _load_timm(name: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(
            f"unknown model {name!r}: not a timm model name (see timm.list_models()); "
            f"open_clip models are named '{OPEN_CLIP_PREFIX}ARCH/TAG', shipped ones 'zoo:NAME'"
        )
    try:
        if checkpoint is not None:
            # timm's own pretrained loader, pointed at a local file (handles its checkpoint filters)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)}, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "state_dict" in str(err) or "size mismatch" in str(err) or "Missing key" in str(err):
            raise CheckpointError(f"checkpoint {checkpoint} does not fit timm model {name!r}: {err}") from err
        raise
    except Exception as err:
        if pretrained and checkpoint is None and _looks_like_download_failure(err):
            raise WeightsUnavailableError(
                f"pretrained weights for timm model {name!r} could not be loaded ({type(err).__name__}: "
                f"{str(err)[:200]}). Offline, download the weights elsewhere (e.g. the Hugging Face repo "
                f"'timm/{name}', file model.safetensors), copy the file here and call "
                f"load_model({name!r}, checkpoint='path/to/model.safetensors') or use --checkpoint; "
                "or pass pretrained=False for random-init weights."
            ) from err
        raise
    overrides = {}
    if "img_size" in kwargs:  # the pretrained config still names the original size
        size = kwargs["img_size"]
        overrides["input_size"] = (3, *((size, size) if isinstance(size, int) else tuple(size)))
        overrides["crop_pct"] = 1.0
    data_cfg = timm.data.resolve_data_config(overrides, model=model)
    preprocess = timm.data.create_transform(**data_cfg, is_training=False)
    tag = getattr(model, "pretrained_cfg", {}).get("tag") if pretrained else None
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=name,
        source="timm",
        weights_id=_weights_id(name, pretrained, checkpoint, tag),
        info={"image_size": tuple(data_cfg["input_size"][1:]), "data_config": data_cfg},
    )


def _load_open_clip(spec: str, pretrained: bool, checkpoint: Path | None, **kwargs: Any) -> LoadedModel:
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    source: str | None
    if checkpoint is not None:
        source = str(checkpoint)
    elif pretrained:
        if not tag:
            tags = [t for a, t in open_clip.list_pretrained() if a == arch]
            raise ValueError(f"say which open_clip weights: '{OPEN_CLIP_PREFIX}{arch}/TAG', TAG in {tags}")
        source = tag
    else:
        source = None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, **kwargs)
    except Exception as err:
        if checkpoint is not None and isinstance(err, RuntimeError):
            raise CheckpointError(f"checkpoint {checkpoint} does not fit open_clip {arch!r}: {err}") from err
        if source is not None and checkpoint is None and _looks_like_download_failure(err):
            raise WeightsUnavailableError(
                f"open_clip weights {arch}/{tag} could not be loaded ({type(err).__name__}: {str(err)[:200]}). "
                f"Offline, fetch the checkpoint elsewhere, copy it here and call "
                f"load_model('{OPEN_CLIP_PREFIX}{arch}', checkpoint='path/to/open_clip_model.safetensors')."
            ) from err
        raise
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=f"{OPEN_CLIP_PREFIX}{arch}",
        source="open_clip",
        weights_id=_weights_id(f"{OPEN_CLIP_PREFIX}{arch}", pretrained, checkpoint, tag or None),
        tokenizer=open_clip.get_tokenizer(arch),
        info={"image_size": size, "arch": arch},
    )


def _looks_like_download_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    words = ("connect", "network", "resolve", "offline", "hub", "download", "http", "url", "timed out", "not found")
    return isinstance(err, OSError) or any(w in text for w in words)


#: Name prefixes and their loaders, each called as ``loader(spec, pretrained, checkpoint, **kwargs)``
#: with the name's part after the prefix; a name without one of these prefixes is timm's.
_SCHEMES: dict[str, Callable[..., LoadedModel]] = {ZOO_PREFIX: _load_zoo, OPEN_CLIP_PREFIX: _load_open_clip}
