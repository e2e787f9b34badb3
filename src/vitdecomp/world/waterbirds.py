"""A Waterbirds-like split: a binary label (two shape families) spuriously tied to the place.

As in Waterbirds (Sagawa et al. 2020): ``y`` = 1 for "water" shapes, 0 for "land" shapes;
``place`` = 1 for water backgrounds, 0 for land backgrounds. In the training split ``place == y``
for exactly ``round(corr * n_train)`` images (95 % by default); in validation and test the four
``(y, place)`` groups are balanced. ``split`` uses Waterbirds' codes: 0 train, 1 val, 2 test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitdecomp.world.attributes import ATTRIBUTES
from vitdecomp.world.scenes import Scenes, _chunk_rng, make_scenes

#: Shapes of the two label families (y = 0 "land" shapes, y = 1 "water" shapes).
WATERBIRD_SHAPES = {0: ("square", "triangle", "cross"), 1: ("circle", "hexagon", "star")}
#: Backgrounds of the two places.
LAND = ("grass", "sand", "snow")
WATER = ("water", "sky")
PLACES = {0: LAND, 1: WATER}
SPLIT_NAMES = {0: "train", 1: "val", 2: "test"}


@dataclass
class Waterbirds:
    scenes: Scenes
    y: np.ndarray  # int [N]
    place: np.ndarray  # int [N]
    split: np.ndarray  # int [N], 0 train / 1 val / 2 test

    def group(self) -> np.ndarray:
        """Group index 2 * y + place (0 land shape on land, ..., 3 water shape on water)."""
        return 2 * self.y + self.place


def _balanced(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = np.arange(n) % 4
    rng.shuffle(g)
    return g // 2, g % 2


def _correlated(n: int, corr: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    n_aligned = round(corr * n)
    aligned = np.zeros(n, dtype=bool)
    aligned[:n_aligned] = True
    rng.shuffle(aligned)
    place = np.where(aligned, y, 1 - y)
    return y, place


def make_waterbirds(
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 2000,
    seed: int = 0,
    size: int = 64,
    corr: float = 0.95,
    max_distractors: int = 0,
) -> Waterbirds:
    """Generate the three splits (concatenated: train, then val, then test)."""
    if not 0.0 <= corr <= 1.0:
        raise ValueError("corr must be in [0, 1]")
    rng = _chunk_rng(seed, 0, 1000)
    y_tr, p_tr = _correlated(n_train, corr, rng)
    y_va, p_va = _balanced(n_val, rng)
    y_te, p_te = _balanced(n_test, rng)
    y = np.concatenate([y_tr, y_va, y_te]).astype(np.int64)
    place = np.concatenate([p_tr, p_va, p_te]).astype(np.int64)
    split = np.repeat(np.array([0, 1, 2]), [n_train, n_val, n_test])
    n = len(y)
    shape_ids = {k: np.array([ATTRIBUTES["shape"].index(s) for s in v]) for k, v in WATERBIRD_SHAPES.items()}
    bg_ids = {k: np.array([ATTRIBUTES["background"].index(s) for s in v]) for k, v in PLACES.items()}
    pick_s = rng.integers(0, 1 << 30, n)
    pick_b = rng.integers(0, 1 << 30, n)
    shape = np.where(y == 1, shape_ids[1][pick_s % 3], shape_ids[0][pick_s % 3])
    background = np.where(place == 1, bg_ids[1][pick_b % len(bg_ids[1])], bg_ids[0][pick_b % len(bg_ids[0])])
    scenes = make_scenes(
        n,
        seed=seed,
        size=size,
        max_distractors=max_distractors,
        fixed={"shape": shape, "background": background},
    )
    scenes.meta["waterbirds"] = {"corr": corr, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    return Waterbirds(scenes=scenes, y=y, place=place, split=split)
