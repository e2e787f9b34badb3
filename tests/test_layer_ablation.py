"""Mean-ablation (the one mechanism both ablation commands use) and vitdecomp ablate: zero layers
removed is the unablated accuracy, everything removed is chance, a feature's planted component
matters more than random ones, and the command writes its outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdecomp.apps.classifiers import LinearHead, accuracy
from vitdecomp.apps.layer_ablation import AblateConfig, LayerAblation, feature_effects, layer_curve, layer_order
from vitdecomp.apps.mean_ablation import MeanAblation
from vitdecomp.components import ComponentLabel
from vitdecomp.report.outputs import write_app_outputs
from vitdecomp.results import AppSection


def run_ablate(cfg: AblateConfig, command: str = ""):
    """What ``vitdecomp ablate`` does: run the application, write its files into ``cfg.out``."""
    result = LayerAblation().run(cfg)
    result.command = command or result.command
    write_app_outputs(result, cfg.out)
    return result


def toy(n: int = 600, seed: int = 0):
    """Two features over 3 classes each; L0.H0 writes feature "a" (dims 0-2), L1.H0 feature "b"
    (dims 3-5), L1.mlp noise, init a constant. ``[N, 4, 6]`` contributions and labels."""
    g = torch.Generator().manual_seed(seed)
    a = torch.arange(n) % 3
    b = torch.randperm(n, generator=g) % 3
    c = torch.zeros(n, 4, 6)
    c[:, 0] = 0.5
    c[torch.arange(n), 1, a] = 2.0
    c[torch.arange(n), 2, 3 + b] = 2.0
    c[:, 3] = 0.3 * torch.randn(n, 6, generator=g)
    parts = [
        ComponentLabel("init"),
        ComponentLabel("attn_head", layer=0, head=0),
        ComponentLabel("attn_head", layer=1, head=0),
        ComponentLabel("mlp", layer=1),
    ]
    return c, parts, {"a": a.numpy(), "b": b.numpy()}


def test_mean_ablation_of_nothing_is_the_representation_and_prefixes_match_single_sets():
    c, parts, _ = toy()
    ab = MeanAblation.fit(c, [p.name for p in parts], np.arange(300))
    torch.testing.assert_close(ab.ablate([]), c.sum(1))
    order = [2, 0, 3, 1]
    pre = list(ab.prefixes(order, [0, 1, 2, 4], rows=np.arange(300, 600)))
    assert len(pre) == 4
    for j, k in enumerate([0, 1, 2, 4]):
        torch.testing.assert_close(pre[j], ab.ablate(order[:k], np.arange(300, 600)), atol=1e-5, rtol=1e-5)
    assert ab.index(["L1.mlp", "init"]) == [3, 0]
    with pytest.raises(ValueError, match="ascending"):
        list(ab.prefixes(order, [2, 1]))


def test_layer_ablation_of_zero_layers_equals_the_unablated_accuracy_and_all_layers_give_chance():
    c, parts, y = toy()
    train, test = np.arange(0, 600, 2), np.arange(1, 600, 2)
    ab = MeanAblation.fit(c, [p.name for p in parts], train)
    probes = {f: LinearHead.fit(ab.whole(train), v[train]) for f, v in y.items()}
    curve = layer_curve(ab, parts, {"probe": probes}, {f: v[test] for f, v in y.items()}, test)
    assert layer_order(parts) == [0, 1] and [p.removed for p in curve] == [0, 1, 2]
    for f, probe in probes.items():
        assert curve[0].probe[f] == accuracy(probe.predict(ab.whole(test)), y[f][test])
        assert curve[0].probe[f] == 1.0
    assert curve[1].layers == [1] and curve[1].probe["b"] < 0.5 < curve[1].probe["a"]
    assert curve[2].probe == {"a": pytest.approx(1 / 3, abs=0.01), "b": pytest.approx(1 / 3, abs=0.02)}


def test_mean_ablating_every_component_gives_chance():
    c, parts, y = toy()
    train, test = np.arange(0, 600, 2), np.arange(1, 600, 2)
    ab = MeanAblation.fit(c, [p.name for p in parts], train)
    probe = LinearHead.fit(ab.whole(train), y["a"][train])
    z = ab.ablate(range(4), test)
    assert torch.allclose(z, z[:1].expand_as(z)), "every image becomes the same mean image"
    assert accuracy(probe.predict(z), y["a"][test]) == pytest.approx(1 / 3, abs=0.01)


def test_a_features_planted_component_matters_more_than_random_ones():
    c, parts, y = toy()
    train, test = np.arange(0, 600, 2), np.arange(1, 600, 2)
    ab = MeanAblation.fit(c, [p.name for p in parts], train)
    probes = {f: LinearHead.fit(ab.whole(train), v[train]) for f, v in y.items()}
    orders = {"a": [1, 0, 2, 3], "b": [2, 0, 1, 3]}
    effects = feature_effects(ab, orders, probes, {f: v[test] for f, v in y.items()}, test, [1], n_random=20)
    for e in effects:
        assert e.base == 1.0 and e.top[0] < 0.4, "its own component carried it"
        assert e.random_mean[0] > e.top[0] + 0.3, "a random component rarely is the one"
        assert e.others_top[0] == 1.0, "the other feature is untouched"


@pytest.mark.parametrize("model", ["zoo:deit", "zoo:clip"])
def test_ablate_command_on_world_scenes_writes_json_png_and_a_section(tmp_path, model):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = AblateConfig(
            n_images=60,
            model=model,
            ks=(1, 3),
            n_random=2,
            out=tmp_path / "out",
            cache_dir=tmp_path / "cache",
            align_steps=10,
            progress=False,
        )
        result = run_ablate(cfg, command="vitdecomp ablate ...")
    finally:
        torch.set_num_threads(n)
    doc = json.loads((tmp_path / "out" / "ablate.json").read_text())
    assert [p["removed"] for p in doc["layers"]] == list(range(6)), "zoo ViTs have five blocks"
    assert set(doc["layers"][0]["probe"]) == {"shape", "color", "pattern", "background"}
    assert bool(doc["layers"][0]["zero_shot"]) == (model == "zoo:clip")
    own = doc["layers"][0]["model_head"]
    assert bool(own) == (model == "zoo:deit"), "zoo:deit has a multi-attribute head on its representation"
    if own:  # the shipped head reads its own world well, and loses it with every block removed
        assert min(own.values()) > 0.8 and max(doc["layers"][-1]["model_head"].values()) < 0.5
    assert [e["ks"] for e in doc["features"]] == [[1, 3]] * 4
    assert (tmp_path / "out" / "ablate.png").stat().st_size > 0
    section = result.section()
    assert isinstance(section, AppSection) and len(section.rows) == 4 and section.figures


def test_ablate_needs_labels_for_a_plain_folder(tmp_path, capsys):
    from PIL import Image

    from vitdecomp.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(folder / f"{i}.png")
    args = ["ablate", "--images", str(folder), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--quiet"]) == 2
    assert "give --labels" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("img_filename,colour\n0.png,red\n1.png,red\n")
    assert main([*args, "--labels", str(tmp_path / "labels.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "labels.csv: no row for 1 image(s)" in err and "\n" not in err


def test_the_result_follows_the_application_contract(tmp_path):
    """JSON both ways (layers and features included), a section with the curves as a figure, and the
    files ``vitdecomp ablate`` writes: ablate.json, ablate.png, ablate.section.json."""
    from vitdecomp.apps.layer_ablation import AblateResult

    c, parts, y = toy()
    train, test = np.arange(0, 600, 2), np.arange(1, 600, 2)
    ab = MeanAblation.fit(c, [p.name for p in parts], train)
    probes = {f: LinearHead.fit(ab.whole(train), v[train]) for f, v in y.items()}
    y_test = {f: v[test] for f, v in y.items()}
    layers = layer_curve(ab, parts, {"probe": probes}, y_test, test)
    effects = feature_effects(ab, {"a": [1, 0, 2, 3], "b": [2, 0, 1, 3]}, probes, y_test, test, [1, 2], n_random=2)
    result = AblateResult("toy", "arrays", "text_probe", len(train), len(test), layers, effects)
    assert AblateResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    names = sorted(p.name for p in write_app_outputs(result, tmp_path))
    assert names == ["ablate.json", "ablate.png", "ablate.section.json"]
    section = AppSection.from_dict(json.loads((tmp_path / "ablate.section.json").read_text()))
    assert section == result.section() and section.figures[0].data_uri.startswith("data:image/png;base64,")
