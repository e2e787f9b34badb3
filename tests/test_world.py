"""The built-in world: determinism, coverage, masks, captions, the Waterbirds-like split, export."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from vitdecomp.world import (
    ATTRIBUTES,
    LAND,
    WATER,
    WATERBIRD_SHAPES,
    all_captions,
    caption,
    export_waterbirds,
    export_world,
    make_scenes,
    make_waterbirds,
    prompt_texts,
)
from vitdecomp.world.scenes import CHUNK


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _digest(s) -> str:
    h = hashlib.sha256()
    h.update(s.images.tobytes())
    h.update(s.masks.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(400, seed=3)


def test_vocabularies():
    assert len(ATTRIBUTES["shape"]) >= 6
    assert len(ATTRIBUTES["color"]) >= 6
    assert len(ATTRIBUTES["pattern"]) >= 4
    assert len(ATTRIBUTES["background"]) >= 4
    for values in ATTRIBUTES.values():
        assert len(set(values)) == len(values)
        assert all(isinstance(v, str) and v for v in values)


def test_types_and_shapes(scenes):
    assert scenes.images.dtype == np.uint8 and scenes.images.shape == (400, 64, 64, 3)
    assert scenes.masks.dtype == bool and scenes.masks.shape == (400, 64, 64)
    assert len(scenes.captions) == 400
    for k in ATTRIBUTES:
        assert scenes.attributes[k].shape == (400,)
    rec = scenes.records()[0]
    assert rec["shape"] in ATTRIBUTES["shape"] and rec["caption"] == scenes.captions[0]


def test_same_seed_same_bytes_different_seed_different(scenes):
    again = make_scenes(400, seed=3)
    assert _digest(again) == _digest(scenes)
    assert again.captions == scenes.captions
    for k in scenes.attributes:
        np.testing.assert_array_equal(again.attributes[k], scenes.attributes[k])
    other = make_scenes(400, seed=4)
    assert _digest(other) != _digest(scenes)
    assert (other.images != scenes.images).any(axis=(1, 2, 3)).mean() > 0.99


def test_prefix_stable(scenes):
    # image i depends only on (seed, i): a shorter run is a prefix of a longer one
    short = make_scenes(37, seed=3)
    np.testing.assert_array_equal(short.images, scenes.images[:37])
    np.testing.assert_array_equal(short.masks, scenes.masks[:37])
    later = make_scenes(100, seed=3, start=CHUNK)
    np.testing.assert_array_equal(later.images, scenes.images[CHUNK : CHUNK + 100])


def test_every_value_appears_and_attributes_are_independent(scenes):
    n = len(scenes)
    for k, vocab in ATTRIBUTES.items():
        counts = np.bincount(scenes.attributes[k], minlength=len(vocab))
        assert len(counts) == len(vocab) and counts.min() > 0
        # roughly uniform: every value within 50 % of its expected count
        assert np.all(np.abs(counts - n / len(vocab)) < 0.5 * n / len(vocab))
    # pairwise independence: chi-square statistic of each contingency table is not extreme
    keys = ["shape", "color", "pattern", "background"]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            ka, kb = len(ATTRIBUTES[a]), len(ATTRIBUTES[b])
            table = np.zeros((ka, kb))
            np.add.at(table, (scenes.attributes[a], scenes.attributes[b]), 1)
            expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
            chi2 = ((table - expected) ** 2 / expected).sum()
            dof = (ka - 1) * (kb - 1)
            assert chi2 < dof + 6 * np.sqrt(2 * dof), (a, b, chi2, dof)


def test_masks_match_the_object(scenes):
    a = scenes.attributes
    area = scenes.masks.sum((1, 2))
    r = a["radius"]
    ratio = area / (np.pi * r**2)
    assert ratio.min() > 0.15 and ratio.max() < 1.2
    # centroid of the mask is near the drawn centre
    yy, xx = np.mgrid[:64, :64] + 0.5
    cy = (scenes.masks * yy).sum((1, 2)) / area
    cx = (scenes.masks * xx).sum((1, 2)) / area
    assert np.abs(cx - a["cx"]).max() < 0.45 * r.max()
    assert np.abs(cy - a["cy"]).max() < 0.45 * r.max()
    # solid objects: inside the mask (away from the outline) the pixels have the object's colour
    solid = np.nonzero(a["pattern"] == ATTRIBUTES["pattern"].index("solid"))[0][:20]
    for i in solid:
        m = scenes.masks[i]
        inner = m.copy()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        px = scenes.images[i][inner].astype(float)
        assert px.std(0).max() < 12  # one colour (+ jitter-free noise)
        bg = scenes.images[i][~m].astype(float)
        assert np.abs(px.mean(0) - bg.mean(0)).max() > 5  # differs from the background on average
    # shapes differ: mean area relative to r^2 differs between circle and cross
    circ = ratio[a["shape"] == ATTRIBUTES["shape"].index("circle")].mean()
    cross = ratio[a["shape"] == ATTRIBUTES["shape"].index("cross")].mean()
    assert circ > cross + 0.2


def test_fixed_attributes_and_distractors():
    fixed = {"shape": np.full(50, 3), "color": np.arange(50) % 6}
    s = make_scenes(50, seed=1, fixed=fixed)
    assert (s.attributes["shape"] == 3).all()
    np.testing.assert_array_equal(s.attributes["color"], np.arange(50) % 6)
    d = make_scenes(50, seed=1, max_distractors=2)
    assert d.attributes["n_distractors"].max() >= 1
    plain = make_scenes(50, seed=1)
    assert not np.array_equal(d.images, plain.images)
    with pytest.raises(ValueError):
        make_scenes(5, seed=1, fixed={"shape": [99] * 5})


def test_sizes():
    s = make_scenes(8, seed=0, size=96)
    assert s.images.shape == (8, 96, 96, 3) and s.masks.any((1, 2)).all()


def test_captions():
    attrs = {"shape": "star", "color": "red", "pattern": "striped", "background": "water", "size": "small"}
    caps = all_captions(attrs)
    assert len(caps) >= 6
    for c in caps:
        assert "star" in c and "red" in c
    assert caption(attrs, 0) != caption(attrs, 1)
    s = make_scenes(256, seed=0)
    # each caption names the image's shape and colour
    for i in range(256):
        assert s.words("shape")[i] in s.captions[i] and s.words("color")[i] in s.captions[i]
    assert len(set(s.captions)) > 180
    assert all("{" not in p for k in ATTRIBUTES for v in ATTRIBUTES[k] for p in prompt_texts(k, v))


def test_waterbirds_group_structure():
    wb = make_waterbirds(n_train=400, n_val=100, n_test=200, seed=5)
    s = wb.scenes
    assert len(s) == 700
    train, val, test = (wb.split == 0), (wb.split == 1), (wb.split == 2)
    assert train.sum() == 400 and val.sum() == 100 and test.sum() == 200
    assert (wb.y[train] == wb.place[train]).mean() == pytest.approx(0.95, abs=1e-3)
    assert abs(wb.y[train].mean() - 0.5) < 0.01
    for sel, n in ((val, 100), (test, 200)):
        counts = np.bincount(wb.group()[sel], minlength=4)
        assert (counts == n // 4).all(), counts
    shapes = np.array(ATTRIBUTES["shape"])[s.attributes["shape"]]
    bgs = np.array(ATTRIBUTES["background"])[s.attributes["background"]]
    for y in (0, 1):
        assert set(shapes[wb.y == y]) == set(WATERBIRD_SHAPES[y])
    assert set(bgs[wb.place == 0]) == set(LAND) and set(bgs[wb.place == 1]) == set(WATER)
    # colour / pattern stay independent of the label
    for k in ("color", "pattern"):
        assert np.bincount(s.attributes[k][wb.y == 1]).min() > 0
    wb2 = make_waterbirds(n_train=400, n_val=100, n_test=200, seed=5)
    np.testing.assert_array_equal(wb2.scenes.images, s.images)


def test_export_world(tmp_path):
    from PIL import Image

    out = export_world(12, seed=2, out_dir=tmp_path / "w", progress=False)
    rows = _rows(out / "attributes.csv")
    assert len(rows) == 12
    s = make_scenes(12, seed=2)
    for i, row in enumerate(rows):
        img = np.array(Image.open(out / row["img_filename"]))
        np.testing.assert_array_equal(img, s.images[i])
        mask = np.array(Image.open(out / row["mask_filename"])) > 127
        np.testing.assert_array_equal(mask, s.masks[i])
        for k in ATTRIBUTES:
            assert row[k] == ATTRIBUTES[k][s.attributes[k][i]]
        assert row["caption"] == s.captions[i]
    assert (out / "world.json").is_file()


def test_export_waterbirds_and_cli(tmp_path):
    import argparse

    from vitdecomp.commands.world import configure

    parser = argparse.ArgumentParser()
    configure(parser.add_subparsers(dest="command").add_parser("world"))
    args = parser.parse_args(
        [
            "world",
            "export",
            "--n",
            "28",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "wb"),
            "--waterbirds",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    rows = _rows(tmp_path / "wb" / "metadata.csv")
    assert len(rows) == 28
    assert {"img_filename", "y", "split", "place"} <= set(rows[0])
    assert {r["split"] for r in rows} == {"0", "1", "2"}
    assert all((tmp_path / "wb" / r["img_filename"]).is_file() for r in rows)
    direct = export_waterbirds(tmp_path / "wb2", 16, 4, 8, seed=1, progress=False)
    assert len(_rows(direct / "metadata.csv")) == 28


def test_attribute_vocabularies_are_a_leaf_that_scenes_and_captions_share():
    import ast
    from pathlib import Path

    import vitdecomp.world as world

    def project_imports(name):
        tree = ast.parse((Path(world.__file__).parent / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and "vitdecomp" in (n.module or "")}

    assert project_imports("attributes") == set()
    assert project_imports("captions") == {"vitdecomp.world.attributes"}
    assert "vitdecomp.world.captions" in project_imports("scenes")
