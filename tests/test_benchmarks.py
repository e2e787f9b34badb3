"""The standard benchmark runners on small files written in exactly the users' formats: ImageNet-segmentation's
``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5, built here from world scenes and masks) through ``vitdecomp segment
--mat``, and the official Waterbirds folder (class folders + ``metadata.csv`` with its six columns, built from
``vitdecomp world export --waterbirds``) through ``vitdecomp debias``. Each runner's figures equal what the
same maps / heads give through the plain command on the same images, and the published figures are printed
beside them."""

from __future__ import annotations

import csv
import json
import re
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from vitdecomp.apps.debias import DebiasResult
from vitdecomp.apps.imagenet_seg import read_mat
from vitdecomp.apps.masks import SegmentSet, to_input
from vitdecomp.apps.pixels import input_geometry, square_preprocess
from vitdecomp.apps.seg_metrics import segmentation_metrics, two_class_ap
from vitdecomp.apps.segment import SegmentResult, _batches
from vitdecomp.cli import main

#: The first 128 bytes of a MATLAB v7.3 file's 512-byte user block (text, subsystem offset, version, endian).
MAT_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


def write_gtsegs(path, images, masks, wnids, empty=()):
    """A file in gtsegs_ijcv.mat's layout, the way MATLAB writes a struct ``value`` of cells: every array is
    stored column-major (an ``[H, W, 3]`` image as ``[3, W, H]``, an ``[H, W]`` mask as ``[W, H]``) under
    ``#refs#``; ``/value/img`` and ``/value/target`` hold ``[N, 1]`` references, ``/value/gt`` references to
    ``[1, 1]`` cells of references to the masks. Masks at indices ``empty`` are empty cells (``MATLAB_empty``)."""
    ref = h5py.special_dtype(ref=h5py.Reference)
    n = len(images)
    with h5py.File(path, "w", userblock_size=512) as f:
        refs, value = f.create_group("#refs#"), f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")
        img, gt, target = (value.create_dataset(k, (n, 1), dtype=ref) for k in ("img", "gt", "target"))
        for key in ("img", "gt", "target"):
            value[key].attrs["MATLAB_class"] = np.bytes_("cell")
        for i, (im, mask, wnid) in enumerate(zip(images, masks, wnids, strict=True)):
            img[i, 0] = _array(refs, f"i{i}", np.asarray(im).transpose(2, 1, 0), "uint8").ref
            target[i, 0] = _array(refs, f"t{i}", np.array([[ord(c) for c in wnid]], np.uint16).T, "char").ref
            if i in empty:
                inner = _array(refs, f"m{i}", np.array([0, 0], np.uint64), "double")
                inner.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                inner = _array(refs, f"m{i}", np.asarray(mask, np.uint8).T, "uint8")
            cell = refs.create_dataset(f"c{i}", (1, 1), dtype=ref)
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            cell[0, 0] = inner.ref
            gt[i, 0] = cell.ref
    with open(path, "r+b") as f:
        f.write(MAT_HEADER.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def _array(group, name, data, matlab_class):
    d = group.create_dataset(name, data=data)
    d.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    return d


def world_arrays(n: int = 6, seed: int = 7100):
    """``n`` world scenes and masks; two of them cut to non-square frames (48 x 64, 64 x 40) so that the
    square resize and the file's column-major storage both matter."""
    from vitdecomp.world import make_scenes

    s = make_scenes(n, seed=seed)
    images, masks = list(s.images), list(s.masks.astype(bool))
    images[1], masks[1] = images[1][8:56], masks[1][8:56]
    images[2], masks[2] = images[2][:, 10:50], masks[2][:, 10:50]
    wnids = [f"n0{1440764 + i:07d}" for i in range(n)]
    return images, masks, wnids


# ---------------------------------------------------------------------------------------- reading the .mat


def test_the_mat_reader_follows_the_published_loaders_indexing(tmp_path):
    """What Chefer et al.'s and TextSpan's loaders index (``f[f['/value/img'][i, 0]]`` transposed (2, 1, 0),
    ``f[f[f['/value/gt'][i, 0]][0, 0]]`` transposed (1, 0)) is the image and mask the reader returns, for
    square and non-square images; an empty mask cell is skipped and listed; names carry the WordNet id."""
    images, masks, wnids = world_arrays()
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks, wnids, empty={4})
    with h5py.File(path, "r") as f:
        for i in (0, 1, 2):
            assert np.array_equal(np.array(f[f["/value/img"][i, 0]]).transpose((2, 1, 0)), images[i])
            assert np.array_equal(np.array(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose((1, 0)) != 0, masks[i])
    data = read_mat(path)
    assert data.names == [f"{i:06d}-{wnids[i]}" for i in (0, 1, 2, 3, 5)] and data.skipped == [f"000004-{wnids[4]}"]
    for got, i in zip(range(5), (0, 1, 2, 3, 5), strict=True):
        assert np.array_equal(np.asarray(data.images[got]), images[i]) and np.array_equal(data.masks[got], masks[i])
    assert data.square and data.benchmark == "imagenet-segmentation"
    assert read_mat(path, n=2).names == [f"000000-{wnids[0]}", f"000001-{wnids[1]}"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file: .*nothing.mat"),
        ("not hdf5", "not an HDF5 file"),
        ("no images", r"no /value/img .*not gtsegs_ijcv.mat's layout"),
        ("two sources", "give one image source, not --images and --mat"),
    ],
)
def test_a_bad_mat_is_one_line_naming_the_file(case, message, tmp_path, capsys):
    path = tmp_path / ("nothing.mat" if case == "missing" else "bad.mat")
    if case == "not hdf5":
        path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    elif case in ("no images", "two sources"):
        with h5py.File(path, "w") as f:
            f.create_group("value")
    argv = ["segment", "--mat", str(path), "--out", str(tmp_path / "o"), "--quiet"]
    if case == "two sources":
        argv += ["--images", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitdecomp: error:") and "\n" not in err
    assert re.search(message, err), err


# ---------------------------------------------------------------------------------------- the protocol


def test_two_class_ap_is_the_published_protocols_hand_value():
    """Chefer et al.'s mAP pools the normalised map ranking the object pixels with one minus it ranking the
    background: mask [1, 1, 0], map [1, .5, 0] -> scores (1, .5, 0 | 0, .5, 1) for truths (1, 1, 0 | 0, 0, 1):
    precision 1 at recall 2/3, 3/4 at recall 1 -> 11/12; the object-only AP of the same map is 1; a constant
    map scores every pixel 0 -> 1/2; the mean over images counts images with one class too."""
    mask = torch.tensor([True, True, False])
    assert two_class_ap(torch.tensor([1.0, 0.5, 0.0]), mask) == pytest.approx(11 / 12)
    assert average_precision_score(mask.numpy(), [1.0, 0.5, 0.0]) == 1.0
    assert two_class_ap(torch.full((3,), 7.0), mask) == pytest.approx(0.5)
    maps = torch.stack([torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 0.2]])])
    masks = torch.stack([mask[None], torch.tensor([[True, True, True]])])
    m = segmentation_metrics(maps, masks)
    assert m.mean_ap_two_class == pytest.approx((11 / 12 + two_class_ap(maps[1].flatten(), masks[1].flatten())) / 2)
    assert m.n_ap_images == 1 and m.mean_ap == 1.0


def test_square_resize_feeds_the_whole_image_and_mask_at_the_input_size():
    """The published protocol: a 48 x 64 image becomes the model's 224 x 224 input with nothing cropped
    (the model's interpolation and normalisation kept), and its mask the same 224 x 224 (nearest); these are
    what segment feeds the maps and scores against for a square set, where the model's own centre crop
    would have cut most of a left-quarter object away."""
    import timm

    pre = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    square = square_preprocess(pre)
    x = square(Image.fromarray(rgb))
    by_hand = torch.from_numpy(np.array(Image.fromarray(rgb).resize((224, 224), Image.BICUBIC)))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expect = (by_hand.permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert x.shape == (3, 224, 224) and torch.allclose(x, expect, atol=1e-5)
    geo = input_geometry(square, (48, 64))
    assert geo.resized == (224, 224) and geo.crop == (224, 224) and geo.offset == (0, 0)
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :16] = 255  # the left quarter
    assert (to_input(mask, geo, Image.NEAREST) > 0).sum() == 224 * 56
    assert input_geometry(pre, (48, 64)).crop == (224, 224) and input_geometry(pre, (48, 64)).resized != (224, 224)
    data = SegmentSet(["a"], [Image.fromarray(rgb)], [mask > 0], "one image", square=True)
    (batch,) = _batches(SimpleNamespace(preprocess=pre), data, 4)  # what segment feeds the maps
    assert torch.equal(batch.x[0], x) and int(batch.masks[0].sum()) == 224 * 56
    data.square = False
    (batch,) = _batches(SimpleNamespace(preprocess=pre), data, 4)
    assert int(batch.masks[0].sum()) < 224 * 30  # the model's centre crop cuts most of the left quarter away


def test_square_resize_of_a_transformers_processor():
    """A transformers image processor (shortest edge + centre crop) fed the square-resized image with its own
    resize and crop off: the input is the whole image."""
    transformers = pytest.importorskip("transformers")
    from vitdecomp.models.hf_load import HFImageTransform

    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rgb = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    square = square_preprocess(HFImageTransform(proc))
    x = square(Image.fromarray(rgb))
    resized = Image.fromarray(rgb).resize((32, 32), Image.BICUBIC)
    expect = proc(images=resized, return_tensors="pt", do_resize=False, do_center_crop=False)["pixel_values"][0]
    assert x.shape == (3, 32, 32) and torch.equal(x, expect)
    assert input_geometry(square, (20, 40)).resized == (32, 32)


# ---------------------------------------------------------------------------------------- the runners


def test_the_segmentation_runner_equals_segment_on_the_same_images_and_prints_the_published(tmp_path, capsys):
    """``segment --mat`` on a synthetic gtsegs_ijcv.mat gives exactly the figures ``segment --images --masks
    --resize square`` gives on the same images written as PNGs (every method, every metric), prints the
    published figures beside them and writes benchmark.json; the plain run writes no benchmark."""
    images, masks, wnids = world_arrays()
    mat = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(mat, images, masks, wnids)
    folder, mask_dir = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    mask_dir.mkdir()
    for i, (im, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(im).save(folder / f"{i:06d}-{wnids[i]}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{i:06d}-{wnids[i]}.png")
    common = ["--model", "zoo:deit", "--batch-size", "3", "--quiet"]
    assert main(["segment", "--mat", str(mat), "--out", str(tmp_path / "bench"), *common[:-1]]) == 0
    printed = capsys.readouterr().out
    plain = ["--images", str(folder), "--masks", str(mask_dir), "--resize", "square", "--out", str(tmp_path / "plain")]
    assert main(["segment", *plain, *common]) == 0
    bench, same = (json.loads((tmp_path / d / "segment.json").read_text()) for d in ("bench", "plain"))
    assert bench["n_images"] == same["n_images"] == 6 and "no crop" in bench["resize"]
    assert [m["metrics"] for m in bench["methods"]] == [m["metrics"] for m in same["methods"]]
    assert all(m["metrics"]["mean_ap_two_class"] > 0 for m in bench["methods"])
    doc = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    ours = [r for r in doc["rows"] if r["ours"]]
    assert [r["miou"] for r in ours] == [m["metrics"]["miou"] for m in bench["methods"]]
    assert [r["mean_ap"] for r in ours] == [m["metrics"]["mean_ap_two_class"] for m in bench["methods"]]
    textspan = next(r for r in doc["rows"] if r["method"] == "TextSpan (decomposition)")
    assert (textspan["pixel_accuracy"], textspan["miou"], textspan["mean_ap"]) == (0.7521, 0.5450, 0.8161)
    assert {"ours", "source", "method", "model", "data", "settings", "pixel_accuracy"} <= set(ours[0])
    for shown in ("TextSpan (Gandelsman et al., ICLR 2024)", "| 75.21 | 54.50 | 81.61 |", "LeGrad", "GradCAM"):
        assert shown in printed, shown
    assert "not the benchmark's 4,276" in printed
    assert SegmentResult.from_dict(bench).benchmark_table().to_dict() == doc  # segment.json alone rebuilds it
    assert not (tmp_path / "plain" / "benchmark.json").exists()


def official_waterbirds(tmp_path, export):
    """The official Waterbirds folder's layout from a world export: images in class folders
    (``NNN.Shape/Shape_<id>.png``, as ``001.Black_footed_Albatross/...jpg``) and ``metadata.csv`` with exactly
    the official columns, rows by img_id; also the same rows with only the four columns a Waterbirds-like
    folder needs (``plain.csv``)."""
    with open(export / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    shapes = sorted({r["shape"] for r in rows})
    root = tmp_path / "waterbird_complete95_forest2water2"
    official, plain = [], []
    for r in rows:
        shape = r["shape"]
        name = f"{shapes.index(shape) + 1:03d}.{shape.title()}/{shape.title()}_{int(r['img_id']):04d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(export / r["img_filename"], root / name)
        place_file = f"/{r['background'][0]}/{r['background']}/{int(r['img_id']):08d}.jpg"
        official.append([int(r["img_id"]) + 1, name, r["y"], r["split"], r["place"], place_file])
        plain.append([name, r["y"], r["split"], r["place"]])
    _csv(root / "metadata.csv", ["img_id", "img_filename", "y", "split", "place", "place_filename"], official)
    _csv(tmp_path / "plain.csv", ["img_filename", "y", "split", "place"], plain)
    return root


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_the_waterbirds_runner_equals_debias_on_the_same_folder_and_prints_the_published(tmp_path, capsys):
    """``debias`` on the official Waterbirds layout (class folders, the six official columns, rows in another
    order than the folder's listing) is recognised as the benchmark: its readings equal those of ``debias``
    with the same rows in a four-column file (the plain command, no benchmark), the published figures are
    printed beside them and benchmark.json holds both."""
    from vitdecomp.world.export import export_waterbirds

    export = export_waterbirds(tmp_path / "wb", n_train=40, n_val=12, n_test=20, corr=1.0, progress=False)
    root = official_waterbirds(tmp_path, export)
    common = ["--model", "zoo:deit", "--align-steps", "10", "--n-random", "2", "--cache-dir", str(tmp_path / "c")]
    assert main(["debias", "--images", str(root), "--out", str(tmp_path / "bench"), *common]) == 0
    printed = capsys.readouterr().out
    plain = ["--metadata", str(tmp_path / "plain.csv"), "--out", str(tmp_path / "plain"), "--quiet"]
    assert main(["debias", "--images", str(root), *plain, *common]) == 0
    bench, same = (json.loads((tmp_path / d / "debias.json").read_text()) for d in ("bench", "plain"))
    assert bench["n_images"] == {"train": 40, "val": 12, "test": 20}
    for key in ("readings", "curve", "k", "score", "ranking"):
        assert bench[key] == same[key], key
    assert bench["benchmark"] == "waterbirds" and same["benchmark"] == ""
    doc = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    ours = [r for r in doc["rows"] if r["ours"]]
    after = bench["readings"][1]
    assert ours[1]["worst_group"] == after["test"]["worst"] and ours[1]["average"] == after["test"]["average"]
    assert ours[1]["worst_group_before"] == bench["readings"][0]["test"]["worst"]
    deit = next(r for r in doc["rows"] if r["source"].startswith("NeurIPS") and "deit" in r["model"])
    assert (deit["worst_group_before"], deit["worst_group"], deit["average_before"], deit["average"]) == (
        0.733,
        0.815,
        0.874,
        0.913,
    )
    for shown in ("| 73.30 | 81.50 | 87.40 | 91.30 |", "TextSpan", "Group DRO", "not the official one"):
        assert shown in printed, shown
    assert DebiasResult.from_dict(bench).benchmark_table().to_dict() == doc  # debias.json alone rebuilds it
    assert not (tmp_path / "plain" / "benchmark.json").exists()
