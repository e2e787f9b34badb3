"""The applications: retrieval on a ground truth built by hand, and the heatmap / retrieve commands
end to end on a small analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdecomp.apps.retrieval import Gallery, image_scores, text_scores, top_components


def _world_like(n: int = 240, seed: int = 0):
    """Images with two attributes (colour, shape; 3 values each). Component ``C`` writes the colour's
    text direction plus a shape leak, ``S`` the shape's plus a colour leak, ``N`` noise; CLIP space has
    one orthogonal direction per value."""
    g = torch.Generator().manual_seed(seed)
    colour, shape = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    texts = torch.eye(8)[:6]  # rows 0-2 colours, 3-5 shapes
    c = texts[colour] + 0.6 * texts[3 + shape] + 0.05 * torch.randn(n, 8, generator=g)
    s = texts[3 + shape] + 0.6 * texts[colour] + 0.05 * torch.randn(n, 8, generator=g)
    noise = torch.randn(n, 8, generator=g)
    gallery = Gallery(torch.stack([c, s, noise], 1), torch.zeros(8), ["C", "S", "N"], [str(i) for i in range(n)])
    return gallery, {"colour": colour.numpy(), "shape": shape.numpy()}, texts


def test_text_retrieval_through_a_features_components_finds_that_value():
    gallery, truth, texts = _world_like()
    comps = top_components({"C": 0.9, "S": 0.2, "N": 0.0}, k=1)
    assert comps == ["C"]
    for v in range(3):
        top = text_scores(gallery, texts[v], comps).argsort(descending=True)[:20].numpy()
        assert (truth["colour"][top] == v).mean() == 1.0
    # through the noise component alone it is chance
    top = text_scores(gallery, texts[0], ["N"]).argsort(descending=True)[:20].numpy()
    assert (truth["colour"][top] == 0).mean() < 0.8


def _shares(scores: torch.Tensor, ref: int, truth: dict) -> dict[str, float]:
    order = [i for i in scores.argsort(descending=True).tolist() if i != ref][:20]
    return {a: float((lab[order] == lab[ref]).mean()) for a, lab in truth.items()}


def test_image_retrieval_by_reading_matches_the_feature_and_ignores_the_leak():
    """Plain cosine on the colour component also matches the shape it leaks; its zero-shot reading of
    the colour matches colour only (shape near the chance of 1/3)."""
    gallery, truth, texts = _world_like()
    reading = [_shares(image_scores(gallery, r, ["C"], texts[:3]), r, truth) for r in range(30)]
    cosine = [_shares(image_scores(gallery, r, ["C"], how="cosine"), r, truth) for r in range(30)]
    assert np.mean([s["colour"] for s in reading]) == 1.0
    assert abs(np.mean([s["shape"] for s in reading]) - 1 / 3) < 0.12
    assert np.mean([s["shape"] for s in cosine]) > 0.6


@pytest.fixture(scope="module")
def small_analysis(tmp_path_factory):
    from vitdecomp.analyze import AnalysisConfig, run_analysis

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("apps")
    cfg = AnalysisConfig(
        model="zoo:deit",
        n_images=32,
        random_init=True,
        batch_size=32,
        align_steps=10,
        device="cpu",
        progress=False,
        verbose=False,
        out=root / "out",
        cache_dir=root / "cache",
    )
    run_analysis(cfg)
    yield root
    torch.set_num_threads(n)


def test_heatmap_and_retrieve_commands_write_their_files(small_analysis, tmp_path):
    from PIL import Image

    from vitdecomp.cli import main
    from vitdecomp.world import make_scenes

    image = tmp_path / "scene.png"
    Image.fromarray(make_scenes(1, seed=9).images[0]).resize((80, 100)).save(image)  # not the model's size
    an = str(small_analysis / "out")
    assert main(["heatmap", str(image), "--text", "a red object", "--analysis", an, "--out", str(tmp_path / "h")]) == 0
    raw = np.load(tmp_path / "h" / "scene.npy")
    assert raw.shape == (100, 80), "the map is in the original image's pixels"
    assert (tmp_path / "h" / "scene.png").stat().st_size > 0
    assert (
        main(
            ["heatmap", "--feature", "color", "--heads", "L0.H0,L1.H1", "--analysis", an, "--out", str(tmp_path / "h2")]
        )
        == 0
    )
    meta = json.loads((tmp_path / "h2" / "heatmaps.json").read_text())
    assert len(meta["maps"]) == 4 and meta["maps"][0]["heads"] == ["L0.H0", "L1.H1"]
    # each map says what it was read against, the null it was shrunk by and how the image reads the value
    assert all(m["against"] and m["level"] >= 0 and 0 <= m["reading"] <= 1 for m in meta["maps"])
    assert (
        main(
            [
                "retrieve",
                "--text",
                "a red object",
                "--feature",
                "color",
                "--k",
                "3",
                "--analysis",
                an,
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    ranking = json.loads((tmp_path / "r" / "ranking.json").read_text())
    assert len(ranking["components"]) == 3 and len(ranking["ranking"]) == 20
    assert (
        main(
            [
                "retrieve",
                "--image",
                str(image),
                "--feature",
                "background",
                "--analysis",
                an,
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 0
    )
    assert "<img" in (tmp_path / "r2" / "gallery.html").read_text()


def test_head_grid_has_one_row_per_attention_layer(small_analysis, tmp_path):
    from vitdecomp.apps.head_grids import draw_head_grids, head_grid
    from vitdecomp.results import AnalysisResult

    result = AnalysisResult.load(small_analysis / "out" / "results.json")
    grid, rows = head_grid(result, "color")
    assert rows == ["L0", "L1", "L2", "L3", "L4"] and grid.shape == (5, 4)  # zoo:deit: 5 layers x 4 heads
    assert grid[3, 1] == result.scores["invariant"]["color"]["L3.H1"]
    assert draw_head_grids(result, tmp_path / "g.png").stat().st_size > 0


def test_auto_rules_and_phrases():
    from vitdecomp.apps.analysis import auto_heads, auto_k
    from vitdecomp.evaluation.app_heatmaps import phrase

    heads = [f"L{layer}.H{h}" for layer in range(5) for h in range(4)] + ["L0.mlp", "init"]
    scores = {lab: float(i) for i, lab in enumerate(heads)}
    top = auto_heads(scores, heads)
    assert len(top) == 10 and top[0] == "L4.H3" and "L0.mlp" not in top  # 2 ceil(sqrt(20)) heads, best first
    assert len(auto_heads(scores, heads[:3])) == 3  # never more than there are
    assert [auto_k(c) for c in (1, 4, 32, 160)] == [1, 4, 12, 26]
    assert phrase("a {} object", "orange") == "an orange object" and phrase("a {}", "square") == "a square"


def test_heatmap_rule_study_runs_on_a_small_analysis(small_analysis):
    """``evaluate_apps rules``: every head rule x map, each feature, right and wrong values, shares in
    [0, 1]; the layer rules split the heads by block (zoo:deit: 5 blocks of 4 heads)."""
    from vitdecomp.apps.analysis import load_analysis
    from vitdecomp.evaluation.app_heatmaps import MAP_FEATURES, heatmap_rules

    out = heatmap_rules(load_analysis(small_analysis / "out"), n=4, batch=4)
    rules = ("top", "top sqrt", "all", "first layer", "first half", "last layer")
    runs = ("specific right", "magnitude right", "specific wrong")
    assert set(out["scores"]) == {f"{f} {r} {how}" for f in MAP_FEATURES for r in rules for how in runs}
    assert all(0.0 <= v["pointing"] <= 1.0 and 0.0 <= v["pointing_ties"] <= 1.0 for v in out["scores"].values())
    assert out["heads"]["color"] == {
        "top": 10,
        "top sqrt": 5,
        "all": 20,
        "first layer": 4,
        "first half": 8,
        "last layer": 4,
    }


def test_retrieve_on_a_folder_analysis_reads_the_images_from_that_folder(tmp_path, monkeypatch):
    """Store ids of a folder are relative to it: the gallery must find them from any working directory,
    and ranking.json gives each image's path."""
    from PIL import Image

    from vitdecomp.cli import main
    from vitdecomp.world import make_scenes

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, im in enumerate(make_scenes(6, seed=11).images):
        Image.fromarray(im).save(folder / f"p{i}.png")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--model", "zoo:deit", "--random-init", "--align-steps", "10", "--quiet"]
        assert (
            main(["analyze", "--images", str(folder), "--out", str(out), "--cache-dir", str(tmp_path / "c"), *common])
            == 0
        )
        monkeypatch.chdir(elsewhere)
        assert main(["retrieve", "--text", "a red object", "--analysis", str(out), "--out", str(tmp_path / "r")]) == 0
    finally:
        torch.set_num_threads(n)
    ranking = json.loads((tmp_path / "r" / "ranking.json").read_text())["ranking"]
    assert sorted(r["id"] for r in ranking) == [f"p{i}.png" for i in range(6)]
    assert all(r["path"] == str((folder / r["id"]).resolve()) for r in ranking)
    assert (tmp_path / "r" / "gallery.html").read_text().count("<img") == 6


def test_specificity_command_scores_right_and_wrong_values_for_every_method(small_analysis, tmp_path):
    """``evaluate_apps specificity``: heatmaps of right and wrong values under both rules, and the
    segmentation half for a model with the zoo's attribute heads: every method, both contrasts, the
    predicted and a wrong value."""
    from vitdecomp.commands.evaluate_apps import main as evaluate

    out = tmp_path / "spec.json"
    argv = [
        "specificity",
        "--report",
        str(small_analysis / "out"),
        "--n-images",
        "4",
        "--seed",
        "3",
        "--json",
        str(out),
    ]
    assert evaluate(argv) == 0
    doc = json.loads(out.read_text())
    keys = set(doc["scores"])
    for f in ("color", "shape", "background"):
        for heads in ("top", "all", "random"):
            assert {f"{f} {heads} {r} {w}" for r in ("specific", "mean_others") for w in ("right", "wrong")} <= keys
            assert f"{f} {heads} random_direction -" in keys
    assert (
        "miou" in doc["scores"]["color top specific wrong"]
        and "miou" not in doc["scores"]["background top specific right"]
    )
    seg = doc["segment"]
    assert set(seg) == {
        f"{f} {c} {t}" for f in ("color", "shape") for c in ("expected", "none") for t in ("predicted", "wrong")
    }
    assert set(seg["color expected wrong"]) == {"decomposition", "gradcam", "chefer"}
    assert all(0 <= m["pointing"] <= 1 for m in seg["color none wrong"].values())


def test_image_retrieval_keeps_its_order_readable_where_the_reading_saturates():
    """Every image of the reference's colour reads it at ~1.000; those ties are ordered by the whole
    representation's cosine with the reference, which the ranking shows beside the score."""
    from vitdecomp.apps.retrieval import RetrievalResult, ranking

    gallery, truth, texts = _world_like()
    ref = 0
    scores = image_scores(gallery, ref, ["C"], texts[:3])
    cosine = image_scores(gallery, ref, None, how="cosine")
    same = truth["colour"] == truth["colour"][ref]
    assert (scores[torch.from_numpy(same)] > 0.999).float().mean() > 0.9  # the reading saturates
    rows = ranking(scores, gallery.ids, 20, ref, cosine)
    assert all(truth["colour"][r["row"]] == truth["colour"][ref] for r in rows)
    shown = [(round(r["score"], 3), round(r["full_cosine"], 3)) for r in rows]
    assert shown == sorted(shown, reverse=True) and len(set(shown)) > 15  # readable: not all 1.000
    best = [i for i in cosine.argsort(descending=True).tolist() if same[i] and i != ref and scores[i] > 0.9995]
    assert [r["row"] for r in rows][:5] == best[:5]
    section = RetrievalResult("q", "m", ["C"], 1, rows).section()
    assert section.header == ["image", "score", "full cosine"] and section.rows[0][2] == f"{rows[0]['full_cosine']:.3f}"


def test_relevance_keeps_a_plain_module_whole_even_with_a_model_attribute():
    """transformers' DINOv3ViTModel has a ``model`` attribute (its encoder): the relevance methods must
    explain the whole tower, and unwrap only vitdecomp's own LoadedModel."""
    from torch import nn

    from vitdecomp.apps.relevance import network
    from vitdecomp.models.loaded import LoadedModel

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)

    tower = Tower()
    assert network(tower) is tower
    loaded = LoadedModel(model=tower, preprocess=lambda im: im, name="t", source="timm", weights_id="t")
    assert network(loaded) is tower
