"""Whether a zoo model's shipped card and weights were made by the current training recipe
(:func:`is_up_to_date`, what ``vitdecomp zoo train --resume`` skips). Training tooling: it reads the
recipes (:mod:`vitdecomp.zoo.recipes`), so the library's model source (:mod:`vitdecomp.zoo.cards`)
does not."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitdecomp.zoo.cards import WEIGHTS_DIR, json_default, read_card
from vitdecomp.zoo.models import ZOO_CONFIGS
from vitdecomp.zoo.recipes import RECIPES


def is_up_to_date(name: str, weights_dir: Path | None = None, cards_dir: Path | None = None) -> bool:
    """Whether ``NAME``'s card and weights were made by the current recipe and config (and, for a
    student, from the teacher weights now in place), so a resumed ``zoo train`` may skip it. Recipe
    fields newer than the card count as matching when they hold their default."""
    from vitdecomp.models.loaded import file_digest

    card = read_card(name, cards_dir)
    weights = Path(weights_dir or WEIGHTS_DIR) / f"{name}.safetensors"
    if card is None or not weights.is_file():
        return False
    recipe = RECIPES[name]

    def same(a: Any, b: Any) -> bool:
        return json.loads(json.dumps(a, default=json_default)) == json.loads(json.dumps(b, default=json_default))

    if card.get("weights", {}).get("sha256_16") != file_digest(weights):
        return False
    recorded = card.get("training", {}).get("recipe") or {}
    defaults = asdict(type(recipe)(recipe.objective, recipe.epochs))
    expected = {k: v for k, v in asdict(recipe).items() if k in recorded or not same(v, defaults[k])}
    if not (same(card.get("config"), ZOO_CONFIGS[name]) and same(recorded, expected)):
        return False
    if recipe.distill_from:
        teacher = Path(weights_dir or WEIGHTS_DIR) / f"{recipe.distill_from}.safetensors"
        teacher = teacher if teacher.is_file() else WEIGHTS_DIR / f"{recipe.distill_from}.safetensors"
        if (
            not teacher.is_file()
            or card["training"].get("distill_teacher") != f"zoo:{recipe.distill_from}@{file_digest(teacher)}"
        ):
            return False
    return True
