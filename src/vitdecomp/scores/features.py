"""Features as lists of descriptions: the shipped sets, JSON files, the built-in world's attributes,
and their text embeddings. Imports nothing heavy (the command line checks ``--features`` with it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdecomp.world.attributes import ATTRIBUTES, CORE_ATTRIBUTES

if TYPE_CHECKING:
    import torch


def builtin_feature_sets() -> list[str]:
    """Names of the feature sets shipped in ``vitdecomp/data/features.json`` (+ ``"world"``)."""
    data = json.loads(resources.files("vitdecomp").joinpath("data", "features.json").read_text())
    return [*sorted(k for k in data if not k.startswith("_")), "world"]


def _world_features() -> dict[str, list[str]]:
    return {name: list(ATTRIBUTES[name]) for name in CORE_ATTRIBUTES}


def load_features(
    spec: str | Path | Mapping[str, Sequence[str]] | Sequence[Any] = "paper",
) -> dict[str, list[str]]:
    """Features as ``{name: [descriptions]}``.

    ``spec``: a dict (validated as is; at least one feature); a built-in set name (``"paper"``,
    ``"waterbirds"``, ``"world"`` = the built-in world's attributes); a JSON file holding ``{name:
    [descriptions]}``, or that JSON itself (a string starting with ``{``, as a command line gives it);
    or a list of these, merged in order (a later feature of the same name replaces an earlier one).
    """
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err})") from None
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError('no features in it: give at least one, e.g. {"color": ["red", "blue"]}')
        out: dict[str, list[str]] = {}
        for name, descr in spec.items():
            if isinstance(descr, str) or not isinstance(descr, Sequence):
                raise ValueError(f"feature {name!r}: descriptions must be a list of strings, not {descr!r}")
            descr = [str(d) for d in descr]
            if not descr or any(not d.strip() for d in descr):
                raise ValueError(f"feature {name!r} needs at least one non-empty description")
            out[str(name)] = list(dict.fromkeys(descr))
        return out
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix == ".json" and path.exists():
            return load_features(json.loads(path.read_text()))
        if spec == "world":
            return load_features(_world_features())
        data = json.loads(resources.files("vitdecomp").joinpath("data", "features.json").read_text())
        if str(spec) not in data or str(spec).startswith("_"):
            raise ValueError(f"no feature set {spec!r}: give a dict, a .json file or one of {builtin_feature_sets()}")
        return load_features(data[str(spec)])
    merged: dict[str, list[str]] = {}
    for part in spec:
        merged.update(load_features(part))
    return merged


def embed_features(
    encode: Callable[[list[str]], torch.Tensor], features: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """Text embeddings per feature ``{name: [K, d_clip]}`` with ``encode`` (e.g. a TextEncoder)."""
    return {name: encode(list(descr)) for name, descr in features.items()}
