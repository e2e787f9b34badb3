"""Write generated scenes to disk: PNG images, PNG masks, ``attributes.csv`` (and ``metadata.csv``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from vitdecomp.world.attributes import ATTRIBUTES
from vitdecomp.world.scenes import Scenes, make_scenes
from vitdecomp.world.waterbirds import LAND, SPLIT_NAMES, WATER, WATERBIRD_SHAPES, make_waterbirds

_NUMERIC = ("radius", "cx", "cy", "angle", "n_distractors")


def _write_images(scenes: Scenes, out: Path, progress: bool) -> list[str]:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = []
    it = range(len(scenes))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="writing PNGs", unit="img")
    for i in it:
        name = f"{i:06d}.png"
        Image.fromarray(scenes.images[i]).save(out / "images" / name, optimize=False)
        Image.fromarray(scenes.masks[i].astype(np.uint8) * 255).save(out / "masks" / name)
        names.append(name)
    return names


def _attribute_rows(scenes: Scenes, names: list[str]) -> tuple[list[str], list[list]]:
    header = ["img_filename", "mask_filename", *ATTRIBUTES, *_NUMERIC, "caption"]
    rows = []
    for i, name in enumerate(names):
        row: list = [f"images/{name}", f"masks/{name}"]
        row += [ATTRIBUTES[k][int(scenes.attributes[k][i])] for k in ATTRIBUTES]
        row += [
            round(float(scenes.attributes[k][i]), 4) if k != "n_distractors" else int(scenes.attributes[k][i])
            for k in _NUMERIC
        ]
        row.append(scenes.captions[i])
        rows.append(row)
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def export_world(
    n: int,
    seed: int,
    out_dir: str | Path,
    size: int = 64,
    max_distractors: int = 0,
    progress: bool = True,
) -> Path:
    """Generate ``n`` scenes and write ``images/*.png``, ``masks/*.png``, ``attributes.csv``,
    ``world.json`` (seed, size, vocabularies) under ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    scenes = make_scenes(n, seed=seed, size=size, max_distractors=max_distractors)
    names = _write_images(scenes, out, progress)
    _write_csv(out / "attributes.csv", *_attribute_rows(scenes, names))
    info = {
        "kind": "world",
        "n": n,
        "seed": seed,
        "size": size,
        "max_distractors": max_distractors,
        "attributes": ATTRIBUTES,
    }
    (out / "world.json").write_text(json.dumps(info, indent=1))
    return out


def export_waterbirds(
    out_dir: str | Path,
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 2000,
    corr: float = 0.95,
    seed: int = 0,
    size: int = 64,
    progress: bool = True,
) -> Path:
    """Write the Waterbirds-like split: images, masks, ``metadata.csv`` (``img_id, img_filename, y,
    split, place`` + attributes, Waterbirds' column names and codes) and ``attributes.csv``."""
    out = Path(out_dir)
    wb = make_waterbirds(n_train, n_val, n_test, seed=seed, size=size, corr=corr)
    names = _write_images(wb.scenes, out, progress)
    header, rows = _attribute_rows(wb.scenes, names)
    _write_csv(out / "attributes.csv", header, rows)
    meta_rows = [
        [
            i,
            f"images/{name}",
            int(wb.y[i]),
            int(wb.split[i]),
            int(wb.place[i]),
            *(ATTRIBUTES[k][int(wb.scenes.attributes[k][i])] for k in ("shape", "color", "pattern", "background")),
        ]
        for i, name in enumerate(names)
    ]
    _write_csv(
        out / "metadata.csv",
        ["img_id", "img_filename", "y", "split", "place", "shape", "color", "pattern", "background"],
        meta_rows,
    )
    info = {
        "kind": "waterbirds",
        "seed": seed,
        "size": size,
        "corr": corr,
        "splits": SPLIT_NAMES,
        "n": {"train": n_train, "val": n_val, "test": n_test},
        "y_shapes": {str(k): list(v) for k, v in WATERBIRD_SHAPES.items()},
        "place_backgrounds": {"0": list(LAND), "1": list(WATER)},
    }
    (out / "world.json").write_text(json.dumps(info, indent=1))
    return out
