"""Conventional entry points and outputs: ``python -m vitdecomp``, ``--version``, ``--help`` without
torch, ``decompose --out`` readable with plain numpy/safetensors, ``Decomposition.save/load/
to_pandas/_repr_html_``, the report from templates, image folders read as users expect, caches keyed
by what changes them, and ``zoo train`` writing to a user folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from vitdecomp.cli import main


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_python_dash_m_version_and_help_do_not_import_torch():
    proc = _run("-m", "vitdecomp", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vitdecomp {vd.__version__}"
    probe = (
        "import sys, contextlib, io\n"
        "from vitdecomp.cli import main\n"
        "for argv in (['--help'], ['analyze', '--help'], ['decompose', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = _run("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_every_subcommand_is_one_row_and_listed(capsys):
    from vitdecomp.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c.name in text for c in COMMANDS)
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


def test_decompose_out_is_readable_with_plain_numpy_and_safetensors(tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "dec"
    argv = ["decompose", "zoo:deit", "--random-init", "--tokens", "--n-images", "3", "--batch-size", "2"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # --quiet: only where the output is
    arrays = load_file(str(out / "decomposition.safetensors"))
    labels = json.loads((out / "labels.json").read_text())
    c = arrays["contributions"]
    assert isinstance(c, np.ndarray) and c.shape[:2] == (3, len(labels["labels"]))  # every image, not a batch
    np.testing.assert_allclose(c.sum(1), arrays["representation"], rtol=1e-4, atol=1e-4)
    assert arrays["tokens.0"].shape[:2] == (3, len(labels["tokens"][0]["labels"]))
    assert labels["ids"] == [f"world-0-{i:06d}" for i in range(3)]
    assert labels["meta"]["weights_id"] == "zoo:deit@random-init:seed=0"
    # and back into vitdecomp
    d = vd.Decomposition.load(out)
    assert d.names == labels["labels"] and d.meta["ids"] == labels["ids"]
    tok = d.tokens[0]
    heads = d.index([lab.name for lab in tok.labels])
    torch.testing.assert_close(tok.values.sum(2), d.contributions[:, heads], rtol=1e-4, atol=1e-5)


def test_decomposition_save_load_pandas_and_notebook_html(tmp_path):
    loaded = vd.load_model("zoo:deit", random_init=True)
    d = vd.decompose(loaded, torch.randn(2, 3, *loaded.image_size))
    d.save(tmp_path / "d", ids=["a", "b"], meta={"note": "x"})
    back = vd.Decomposition.load(tmp_path / "d")
    torch.testing.assert_close(back.contributions, d.contributions, rtol=0, atol=0)
    assert back.labels == d.labels and back.meta["ids"] == ["a", "b"] and back.meta["note"] == "x"
    df = d.to_pandas()
    assert list(df.index) == d.names and {"kind", "layer", "head", "mean_norm", "share"} <= set(df.columns)
    assert abs(df["share"].sum() - 1) < 1e-6
    page = d._repr_html_()
    assert page.startswith("<div>") and "<table>" in page and "L0.H0" in d.names


# ------------------------------------------------------------------------------------------------
# the report from templates


def _result():
    from vitdecomp.report.results import (
        AlignerInfo,
        Alignment,
        AnalysisResult,
        CacheInfo,
        Completeness,
        ImagesInfo,
        ModelInfo,
        Pick,
        ReaderInfo,
        StoreInfo,
        VocabularyInfo,
    )

    labels = ["init", "L0.H0", "L0.mlp"]
    scores = {m: {"color": {lab: 0.1 * i for i, lab in enumerate(labels)}} for m in ("paper", "invariant")}
    return AnalysisResult(
        model=ModelInfo("<b>m</b>", "m@x", False),
        reader=ReaderInfo("clip", "clip@y"),
        images=ImagesInfo("3 images", "k", 3),
        start_layer=0,
        labels=labels,
        features={"color": ["red"]},
        vocabulary=VocabularyInfo("v", 2, ["{}"]),
        scores=scores,
        rankings={m: {"color": labels[::-1]} for m in scores},
        descriptions={"init": [], "L0.H0": [Pick("a <red> thing", 0.5, 1.0)], "L0.mlp": []},
        mean_aligned_norm=dict.fromkeys(labels, 1.0),
        top_images={lab: [] for lab in labels},
        completeness=Completeness(1e-7, 1e-7, 1e-7),
        alignment=Alignment("compalign", 1.0, "trained", 0.42, {"val_cosine": 0.9}),
        store=StoreInfo("s", {}, "d"),
        aligner=AlignerInfo(None, None),
        cache=CacheInfo("c", 3, 0, "trained", 1),
        warnings=["only 3 images"],
        constant={"init": 1e-8},
    )


def test_report_is_rendered_from_templates_with_every_section(tmp_path):
    from vitdecomp.report import AnalysisResult, render_html
    from vitdecomp.report.html import SECTIONS, environment

    r = _result()
    page = render_html(r, {"L0.H0": ["data:image/png;base64,AA"]})
    for name in SECTIONS:
        assert environment().get_template(f"sections/{name}.html.j2")  # one partial per section
    assert "&lt;b&gt;m&lt;/b&gt;" in page and "<b>m</b>" not in page  # autoescaped
    assert "a &lt;red&gt; thing" in page
    assert "only 3 images" in page  # warnings shown
    assert "rank 1" in page  # constant components marked
    assert "0.420" in page and "cosine to CLIP on the analysed images" in page
    assert "0.900" in page and "held-out cosine (on its training set)" in page  # labelled as such
    r.write(tmp_path / "results.json")
    assert render_html(AnalysisResult.load(tmp_path / "results.json")) == render_html(r)


# ------------------------------------------------------------------------------------------------
# image folders


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


# ------------------------------------------------------------------------------------------------
# caches keyed by what changes them; the zoo's default folder


def test_random_init_is_seeded_and_keyed_by_seed():
    from vitdecomp.pipeline.stages import load_model_for

    a, b, c = (load_model_for("zoo:deit", random_init=True, seed=s) for s in (1, 1, 2))
    assert a.weights_id == b.weights_id != c.weights_id
    pa, pb, pc = (next(m.model.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_aligner_cache_is_keyed_by_image_set_and_training_options():
    from vitdecomp.pipeline.stages import aligner_cache_dir
    from vitdecomp.store import StoreKey

    key = StoreKey("m", "c", ("init",), 0, "p", "images-A")
    opts = {"val_fraction": 0.1, "max_steps": 50, "batch_size": 256}
    base = aligner_cache_dir("/r", key, 1.0, opts)
    assert base == aligner_cache_dir("/r", key, 1.0, dict(opts))
    assert base != aligner_cache_dir("/r", StoreKey("m", "c", ("init",), 0, "p", "images-B"), 1.0, opts)
    assert base != aligner_cache_dir("/r", key, 1.0, {**opts, "max_steps": 1500})
    assert base != aligner_cache_dir("/r", key, 0.5, opts)


def test_untrained_aligner_is_never_cached(tmp_path):
    from vitdecomp.pipeline.stages import get_aligner
    from vitdecomp.store import ArrayRows, StoreKey

    key = StoreKey("m", "c", ("a", "b"), 0, "p", "imgs")
    rows = ArrayRows(torch.randn(20, 2, 4), torch.randn(20, 3), labels=["a", "b"], key=key)
    stage = get_aligner(rows, tmp_path, max_steps=0, progress=False, log=lambda *a: None)
    assert stage.state == "untrained" and stage.path is None and not list(tmp_path.iterdir())


def test_zoo_train_writes_to_a_user_folder_by_default(monkeypatch, tmp_path):
    from vitdecomp.zoo import cli as zoo_cli

    monkeypatch.setenv("VITDECOMP_ZOO_DIR", str(tmp_path / "zoo"))
    assert zoo_cli.user_zoo_dir() == tmp_path / "zoo"
    seen = {}

    def fake_train(name, **kw):
        seen[name] = kw
        return {"training": {"train_time_s": 0.0}}

    monkeypatch.setattr(zoo_cli, "train_and_save", fake_train)
    assert main(["zoo", "train", "simclr", "--quiet", "--no-eval"]) == 0
    assert seen["simclr"]["weights_dir"] == tmp_path / "zoo" / "weights"
    assert main(["zoo", "train", "simclr", "--quiet", "--no-eval", "--replace-shipped"]) == 0
    assert seen["simclr"]["weights_dir"] is None  # the package's own folder


def test_low_precision_tolerance_scales_with_dtype():
    from vitdecomp.decomp.engine import COMPLETENESS_TOLERANCE

    loaded = vd.load_model("zoo:deit", random_init=True)
    x = torch.randn(2, 3, *loaded.image_size)
    for dtype in (torch.float16, torch.bfloat16):
        d = vd.decompose(loaded.model.to(dtype), x.to(dtype))  # no false "rules do not cover" alarm
        assert d.error.max() <= COMPLETENESS_TOLERANCE[dtype]
    loaded.model.float()
