"""Load the shipped zoo models (safetensors only) with their preprocessing, and list their cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitdecomp.errors import CheckpointError
from vitdecomp.models.loading import LoadedModel, file_digest
from vitdecomp.zoo.models import IMAGE_SIZE, ZOO_CONFIGS, ZOO_NAMES, build_model

ZOO_DIR = Path(__file__).parent
WEIGHTS_DIR = ZOO_DIR / "weights"
CARDS_DIR = ZOO_DIR / "cards"


def clip_tokenizer(context_length: int):
    """open_clip's own BPE tokenizer with the zoo CLIP's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def read_card(name: str) -> dict[str, Any] | None:
    path = CARDS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def list_zoo() -> list[dict[str, Any]]:
    """One card per zoo model (names without a shipped card get a stub with ``"trained": False``)."""
    out = []
    for name in ZOO_NAMES:
        card = read_card(name) or {"name": name, "config": ZOO_CONFIGS[name], "trained": False}
        card.setdefault("name", name)
        card["weights_present"] = (WEIGHTS_DIR / f"{name}.safetensors").is_file()
        out.append(card)
    return out


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
    """A zoo model (``deit``, ``dino``, ``swin``, ``maxvit``, ``clip``) in eval mode.

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
        weights_id = f"zoo:{name}@{file_digest(path)}"
    model.eval()
    info: dict[str, Any] = {"image_size": (IMAGE_SIZE, IMAGE_SIZE), "card": card, "config": config}
    tokenizer = None
    if name == "clip":
        from open_clip.transform import image_transform

        from vitdecomp.zoo.train import OPENAI_MEAN, OPENAI_STD

        preprocess = image_transform(IMAGE_SIZE, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
        tokenizer = clip_tokenizer(config["text_cfg"]["context_length"])
        info["arch"] = "zoo-clip"
    else:
        import timm

        data_cfg = timm.data.resolve_data_config({}, model=model)
        preprocess = timm.data.create_transform(**data_cfg, is_training=False)
        info["data_config"] = data_cfg
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=f"zoo:{name}",
        source="zoo",
        weights_id=weights_id,
        tokenizer=tokenizer,
        info=info,
    )
