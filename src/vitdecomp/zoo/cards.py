"""The zoo's files: ``weights/NAME.safetensors`` (fp16) and ``cards/NAME.json`` (config, recipe,
training record, measurements). Part of the zoo as a model source: imports no training module
(whether a pair is up to date with the current recipe: :mod:`vitdecomp.zoo.freshness`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdecomp.zoo.models import ZOO_CONFIGS, ZOO_NAMES

ZOO_DIR = Path(__file__).parent
WEIGHTS_DIR = ZOO_DIR / "weights"
CARDS_DIR = ZOO_DIR / "cards"

if TYPE_CHECKING:  # torch is imported where weights are written, so ``vitdecomp zoo --help`` does not
    from torch import nn


def read_card(name: str, cards_dir: Path | None = None) -> dict[str, Any] | None:
    path = Path(cards_dir or CARDS_DIR) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_card(name: str, card: dict[str, Any], cards_dir: Path | None = None) -> Path:
    cards_dir = Path(cards_dir or CARDS_DIR)
    cards_dir.mkdir(parents=True, exist_ok=True)
    path = cards_dir / f"{name}.json"
    path.write_text(json.dumps(card, indent=1, default=json_default) + "\n")
    return path


def json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def list_zoo() -> list[dict[str, Any]]:
    """One card per zoo model (names without a shipped card get a stub with ``"trained": False``)."""
    out = []
    for name in ZOO_NAMES:
        card = read_card(name) or {"name": name, "config": ZOO_CONFIGS[name], "trained": False}
        card.setdefault("name", name)
        card["weights_present"] = (WEIGHTS_DIR / f"{name}.safetensors").is_file()
        out.append(card)
    return out


def save_checkpoint(model: nn.Module, name: str, weights_dir: Path | None = None) -> Path:
    """Write the state dict as fp16 safetensors (integer buffers kept as they are)."""
    import torch
    from safetensors.torch import save_file

    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    weights_dir.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    path = weights_dir / f"{name}.safetensors"
    save_file(sd, str(path), metadata={"name": name, "format": "pt", "dtype": "float16"})
    path.chmod(0o644)
    return path


def planted_map(name: str, cards_dir: Path | None = None) -> dict[str, list[str]] | None:
    """For a zoo model trained with planted roles, ``{attribute: [component labels]}``: the heads its
    training objective made carry each attribute through their direct contribution (the card's
    ``"planted"`` entry); ``None`` for every other model or name."""
    if not name.startswith("zoo:"):
        return None
    card = read_card(name[4:].split("@")[0], cards_dir)
    planted = (card or {}).get("planted")
    return None if not planted else {a: list(v) for a, v in planted["map"].items()}
