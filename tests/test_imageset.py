"""Image folders read as users expect: converted as a viewer shows them, a world export read as its
images with their attributes, non-UTF-8 names and a key of the files' bytes, unreadable files
skipped and listed, files decoded by a DataLoader with workers."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def test_images_are_converted_as_a_viewer_shows_them(tmp_path):
    from vitdecomp.imageset import BACKGROUND, read_image

    ramp16 = (np.arange(64, dtype=np.uint16)[None].repeat(8, 0) * 1024).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "i16.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, 0)).save(tmp_path / "f.tif")
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(tmp_path / "p.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    for name in ("i16.png", "f.tif"):
        a = np.asarray(read_image(tmp_path / name))
        assert a.dtype == np.uint8 and a.shape[-1] == 3
        assert a.min() < 10 and a.max() > 240 and len(np.unique(a)) > 30, name  # a ramp, not white/black
    assert tuple(np.asarray(read_image(tmp_path / "p.png"))[0, 0]) == (255, 0, 0)
    r, g, b = np.asarray(read_image(tmp_path / "c.jpg"))[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert tuple(np.asarray(read_image(tmp_path / "a.png"))[0, 0]) == BACKGROUND  # composited


def test_world_export_folder_reads_images_not_masks_with_attributes(tmp_path):
    from vitdecomp.imageset import folder_source
    from vitdecomp.world import export_world

    export_world(6, seed=1, out_dir=tmp_path / "w", progress=False)
    src = folder_source(tmp_path / "w")
    assert len(src) == 6 and all(i.startswith("images/") for i in src.ids)
    assert src.is_world and set(src.attributes) >= {"shape", "color"}
    assert "world export" in src.description


def test_non_utf8_names_and_content_hash_key(tmp_path):
    from vitdecomp.imageset import folder_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    weird = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(weird)
    src = folder_source(folder)
    assert "caf\\xe9.png" in src.ids and all(i.encode("utf-8") for i in src.ids)
    assert np.asarray(src.image(src.ids.index("caf\\xe9.png"))).mean() == 200
    # the same size and mtime, other bytes: another key (no stale rows)
    path = folder / "ok1.png"
    st = path.stat()
    data = bytearray(path.read_bytes())
    Image.fromarray(np.full((8, 8, 3), 41, np.uint8)).save(path)
    assert len(path.read_bytes()) == len(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert folder_source(folder).key != src.key


def test_skip_report_lists_bad_files_and_the_loader_uses_workers(tmp_path, monkeypatch):
    from vitdecomp import imageset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "bad.png").write_bytes(b"nope")
    monkeypatch.setenv("VITDECOMP_WORKERS", "2")
    src = imageset.folder_source(folder, skip_bad=True)
    assert len(src) == 3 and len(src.errors) == 1 and "bad.png" in imageset.skip_report(src)
    batches = list(src.batches(2)(1))
    assert [ids for ids, _ in batches] == [["ok1.png", "ok2.png"]]


def test_a_broken_file_is_found_up_front_with_the_skip_hint(tmp_path):
    """Every file is decoded when the set is listed (not mid-run), and the error names the file and
    ``--skip-bad-images``; a file whose header is fine but whose data is cut short is found too."""
    import pytest

    from vitdecomp.errors import ImageReadError
    from vitdecomp.imageset import folder_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    whole = (folder / "ok0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])  # a valid header, half the data
    with pytest.raises(ImageReadError, match=r"cut\.png") as info:
        folder_source(folder)
    assert "--skip-bad-images" in str(info.value) and "\n" not in str(info.value)
    src = folder_source(folder, skip_bad=True)
    assert src.ids == ["ok0.png", "ok1.png", "ok2.png"] and "cut.png" in src.errors[0]


def test_a_world_export_that_no_longer_matches_its_csv(tmp_path):
    """One PNG of a world export converted to JPEG: refused naming attributes.csv, the missing file and
    the file it does not list; with skip_bad, read as far as it matches, both listed."""
    import pytest

    from vitdecomp.errors import ImageReadError
    from vitdecomp.imageset import folder_source, list_images, read_image
    from vitdecomp.world import export_world

    root = export_world(5, seed=1, out_dir=tmp_path / "w", progress=False)
    png = root / "images" / "000002.png"
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    png.unlink()
    for read in (folder_source, list_images):
        with pytest.raises(ImageReadError) as info:
            read(root)
        text = str(info.value)
        assert "attributes.csv" in text and "images/000002.png" in text and "images/000002.jpg" in text
        assert "--skip-bad-images" in text
    with pytest.raises(ImageReadError, match=r"000002\.png: No such file"):  # not a bare FileNotFoundError
        read_image(png)
    src = folder_source(root, skip_bad=True)
    assert len(src) == 4 and "images/000002.png" not in src.ids and len(src.attributes["shape"]) == 4
    assert any("000002.png" in e for e in src.errors) and any("000002.jpg" in e for e in src.errors)


def test_world_source_renders_scenes_lazily_with_memory_flat_in_n():
    """Generated scenes are rendered a chunk at a time when read (at most WorldScenes.HELD_BYTES of
    chunks held, none pickled), pixel for pixel and attribute for attribute what make_scenes gives."""
    import pickle

    from vitdecomp.imageset import WorldScenes, world_source
    from vitdecomp.world import make_scenes
    from vitdecomp.world.scenes import CHUNK

    n = 6 * CHUNK + 10
    src, want = world_source(n, seed=5, size=16), make_scenes(n, seed=5, size=16)
    assert isinstance(src._get, WorldScenes) and not src._get.held  # nothing rendered up front
    assert set(src.attributes) == set(want.attributes)
    assert all(np.array_equal(src.attributes[k], v) for k, v in want.attributes.items())
    src._get.HELD_BYTES = 3 * CHUNK * 16 * 16 * 3  # three chunks' worth
    assert src._get.max_held == 3
    for _ in src.batches(100)(0):  # a full pass, as the store fill reads it
        assert len(src._get.held) <= 3
    for i in (0, CHUNK - 1, CHUNK, 3 * CHUNK + 7, n - 1):
        assert np.array_equal(np.asarray(src.image(i)), want.images[i]), i
    again = pickle.loads(pickle.dumps(src))
    assert not again._get.held and np.array_equal(np.asarray(again.image(n - 1)), want.images[n - 1])
