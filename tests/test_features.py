"""``vitdecomp features`` end to end on a small analysis of a folder of images: the files a user reads
with plain numpy, the report's section, an SAE brought in a published layout, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitdecomp.cli import main
from vitdecomp.report.html import render_html
from vitdecomp.results import AnalysisResult
from vitdecomp.store import reopen_store


@pytest.fixture(scope="module")
def folder_analysis(tmp_path_factory):
    """``vitdecomp analyze`` on a folder of 40 images (zoo:deit, a short alignment)."""
    from vitdecomp.world import make_scenes

    root = tmp_path_factory.mktemp("features")
    folder = root / "photos"
    folder.mkdir()
    for i, im in enumerate(make_scenes(40, seed=12).images):
        Image.fromarray(im).save(folder / f"img{i:02d}.png")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--model", "zoo:deit", "--align-steps", "10", "--cache-dir", str(root / "cache"), "--quiet"]
    assert main(["analyze", "--images", str(folder), "--out", str(root / "out"), "--no-apps", *common]) == 0
    yield root
    torch.set_num_threads(n)


def test_features_writes_numpy_readable_files_and_a_report_section(folder_analysis, capsys):
    out, report = folder_analysis / "f", folder_analysis / "out"
    args = ["features", "--analysis", str(report), "--out", str(out), "--steps", "60", "--show", "3", "--top", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and "dead latents" in printed and "section 'features' added" in printed
    doc = json.loads((out / "features.json").read_text())
    acts = np.load(out / "activations.npy")
    latents = doc["latents"]
    assert acts.shape == (40, doc["sae"]["latents"]) == (40, len(latents))
    store = json.loads((report / "results.json").read_text())["store"]["path"]
    assert doc["ids"] == reopen_store(store).ids  # the analysis' image order (file names)
    assert ((acts > 0).sum(1) <= doc["sae"]["k"]).all()
    for x in latents:
        assert {"id", "name", "confidence", "parts"} <= set(x)
        shares = [s for _, s in x["parts"]]
        assert shares == sorted(shares, reverse=True) and len(shares) == 32
        if x["frequency"] > 0:
            assert abs(sum(shares) - 1) < 1e-3
            assert x["frequency"] == pytest.approx((acts[:, x["id"]] > 0).mean())
    assert doc["metrics"]["max_split_error"] <= 1e-5
    assert set(doc["metrics"]["agreement"]["model_head"]) == {"shape", "color", "pattern", "background"}
    assert (out / "sae.safetensors").is_file()
    page = (report / "index.html").read_text()
    section = json.loads((report / "results.json").read_text())["applications"][-1]
    alive = sum(x["frequency"] > 0 for x in latents)
    assert section["name"] == "features" and len(section["rows"]) == len(section["panels"]) == alive
    assert 'class="app-table sortable"' in page and 'href="#panel-features-0"' in page
    shown = [p for p in section["panels"] if p["figures"]]
    assert len(shown) == min(3, alive) and all(len(p["figures"]) <= 2 for p in shown)
    assert page.count('id="panel-features-') == alive
    back = AnalysisResult.load(report / "results.json").applications[-1]  # the typed section, read back
    assert back.panels[0].bars and all(isinstance(b, tuple) for b in back.panels[0].bars)
    assert render_html(AnalysisResult.load(report / "results.json")).count('id="panel-features-') == alive


def test_an_sae_file_is_read_and_its_width_checked(folder_analysis, tmp_path, capsys):
    """A trained SAE file goes back in (--sae): same latents, not retrained; one of another width and a
    missing file are one-line errors (exit 2)."""
    from vitdecomp.sae import load_sae, save_sae

    report = folder_analysis / "out"
    first = folder_analysis / "f"
    if not (first / "sae.safetensors").is_file():
        pytest.skip("needs the first test's output")
    args = ["features", "--report", str(report), "--sae", str(first / "sae.safetensors"), "--show", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.load(tmp_path / "again" / "activations.npy"), np.load(first / "activations.npy"))
    assert json.loads((tmp_path / "again" / "features.json").read_text())["sae"]["trained"] is False
    sae = load_sae(first / "sae.safetensors")
    sae.w_enc, sae.w_dec, sae.b_dec, sae.shift = sae.w_enc[:, :10], sae.w_dec[:, :10], sae.b_dec[:10], None
    save_sae(sae, tmp_path / "narrow.safetensors")
    capsys.readouterr()
    for bad, says in (("narrow.safetensors", "10-dim inputs"), ("missing.safetensors", "no such file")):
        assert (
            main(["features", "--report", str(report), "--sae", str(tmp_path / bad), "--out", str(tmp_path / "x")]) == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitdecomp: error: ") and says in err and "\n" not in err


def test_features_refuses_a_folder_that_is_not_an_analysis(tmp_path, capsys):
    assert main(["features", "--report", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "vitdecomp: error: --report" in capsys.readouterr().err
    assert main(["features", "--report", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
