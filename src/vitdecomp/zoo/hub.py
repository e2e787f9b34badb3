"""Load the shipped zoo models (safetensors only) with their preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitdecomp.errors import CheckpointError
from vitdecomp.models.loaded import LoadedModel, file_digest
from vitdecomp.zoo.cards import WEIGHTS_DIR, read_card
from vitdecomp.zoo.models import HEAD_SIZES, IMAGE_SIZE, NUM_LOGITS, ZOO_CONFIGS, ZOO_NAMES, build_model, clip_tokenizer

__all__ = ["WEIGHTS_DIR", "load_state_dict_file", "load_zoo_model"]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"zoo checkpoints are loaded from safetensors files only, got {path}")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}


def load_zoo_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    random_init: bool = False,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """A zoo model (a name of :data:`~vitdecomp.zoo.models.ZOO_NAMES`) in eval mode.

    ``checkpoint`` overrides the shipped ``weights/NAME.safetensors``; ``config`` the architecture
    recorded in the shipped card (for checkpoints trained with another config);
    ``random_init=True`` skips loading (tests, training). Unknown keyword arguments are refused.
    """
    if kwargs:
        raise TypeError(f"load_zoo_model got unexpected arguments {sorted(kwargs)}")
    if name not in ZOO_CONFIGS:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has {list(ZOO_NAMES)}")
    card = read_card(name) or {}
    config = config or card.get("config") or ZOO_CONFIGS[name]
    model = build_model(name, config)
    if random_init:
        weights_id = f"zoo:{name}@random-init"
    else:
        path = Path(checkpoint) if checkpoint is not None else WEIGHTS_DIR / f"{name}.safetensors"
        _load_weights(model, name, path)
        weights_id = f"zoo:{name}@{file_digest(path)}"
    model.eval()
    preprocess, tokenizer, info = _preprocessing(name, model, config)
    if config.get("num_classes") == NUM_LOGITS:  # the multi-attribute task: one logit block per attribute
        info["attribute_heads"] = dict(HEAD_SIZES)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=f"zoo:{name}",
        source="zoo",
        weights_id=weights_id,
        tokenizer=tokenizer,
        info={"image_size": (IMAGE_SIZE, IMAGE_SIZE), "card": card, "config": config, **info},
    )


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"zoo weights for {name!r} not found at {path}; run `vitdecomp zoo train {name}` "
            "to train them (or pass checkpoint=PATH)"
        )
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit zoo model {name!r}: {err}") from err


def _preprocessing(name: str, model: nn.Module, config: dict[str, Any]) -> tuple[Callable, Callable | None, dict]:
    """The model's own preprocessing (open_clip's image transform for CLIP, timm's from the model's
    data config otherwise), its tokenizer (CLIP only) and what goes into ``LoadedModel.info``."""
    if name == "clip":
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.transform import image_transform

        preprocess = image_transform(IMAGE_SIZE, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
        return preprocess, clip_tokenizer(config["text_cfg"]["context_length"]), {"arch": "zoo-clip"}
    import timm

    data_cfg = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**data_cfg, is_training=False), None, {"data_config": data_cfg}
