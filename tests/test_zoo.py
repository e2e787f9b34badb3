"""The zoo: shipped checkpoints load (safetensors) and run; the training code runs a few steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vitdecomp.world import make_scenes
from vitdecomp.zoo import ZOO_CONFIGS, ZOO_NAMES, build_model, list_zoo, load_zoo_model, representation
from vitdecomp.zoo.cards import WEIGHTS_DIR, save_checkpoint
from vitdecomp.zoo.data import normalize, to_tensor
from vitdecomp.zoo.models import NUM_LOGITS
from vitdecomp.zoo.recipes import Recipe
from vitdecomp.zoo.train import train

EXPECTED_CLASSES = {
    "deit": "VisionTransformer",
    "simclr": "VisionTransformer",
    "swin": "SwinTransformer",
    "maxvit": "MaxxVit",
    "clip": "CLIP",
    "planted": "VisionTransformer",
}


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(4, seed=11)


def test_zoo_names_and_cards():
    assert set(ZOO_NAMES) == set(EXPECTED_CLASSES)
    cards = list_zoo()
    assert [c["name"] for c in cards] == list(ZOO_NAMES)
    total = sum((WEIGHTS_DIR / f"{n}.safetensors").stat().st_size for n in ZOO_NAMES if c_has(n))
    assert total <= 40e6


def c_has(name: str) -> bool:
    return (WEIGHTS_DIR / f"{name}.safetensors").is_file()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_shipped_checkpoint_loads_and_runs(name, scenes):
    assert c_has(name), f"zoo weights for {name} are missing (vitdecomp zoo train {name})"
    loaded = load_zoo_model(name)
    assert type(loaded.model).__name__ == EXPECTED_CLASSES[name]
    assert loaded.name == f"zoo:{name}" and loaded.source == "zoo"
    assert loaded.weights_id.startswith(f"zoo:{name}@") and len(loaded.weights_id) > len(name) + 10
    assert loaded.image_size == (64, 64)
    assert loaded.info["card"]["name"] == name
    assert not loaded.model.training
    # the shipped preprocessing equals the normalisation used in training
    x = torch.stack([loaded.preprocess(scenes.pil(i)) for i in range(len(scenes))])
    assert x.shape == (4, 3, 64, 64)
    ref = normalize(to_tensor(scenes.images), clip=name == "clip")
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        r = representation(loaded.model, name, x)
        assert r.shape[0] == 4 and torch.isfinite(r).all()
        assert r.std(0).mean() > 0  # different images, different representations
        if name == "clip":
            t = loaded.model.encode_text(loaded.tokenizer(["a red star on grass", "a blue circle in the sky"]))
            assert t.shape == (2, r.shape[1])
        elif name != "simclr":  # the self-supervised model has no head
            assert loaded.model(x).shape == (4, NUM_LOGITS)


@pytest.mark.parametrize("name", ["deit", "clip"])
def test_trained_weights_are_not_random(name, scenes):
    trained = load_zoo_model(name)
    torch.manual_seed(0)
    rand = load_zoo_model(name, random_init=True)
    assert rand.weights_id.endswith("random-init")
    x = torch.stack([trained.preprocess(scenes.pil(i)) for i in range(4)])
    with torch.no_grad():
        a = representation(trained.model, name, x)
        b = representation(rand.model, name, x)
    assert not torch.allclose(a, b, atol=1e-3)


def test_load_model_entry_point_and_errors(tmp_path):
    from vitdecomp.errors import CheckpointError
    from vitdecomp.models.loading import load_model

    loaded = load_model("zoo:deit")
    assert loaded.name == "zoo:deit"
    with pytest.raises(ValueError):
        load_zoo_model("nope")
    with pytest.raises(CheckpointError):
        load_zoo_model("deit", checkpoint=tmp_path / "missing.safetensors")
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"0")
    with pytest.raises(CheckpointError):
        load_zoo_model("deit", checkpoint=bad)


def test_checkpoint_roundtrip_fp16(tmp_path):
    from vitdecomp.zoo import read_card

    torch.manual_seed(1)
    model = build_model("swin", (read_card("swin") or {}).get("config") or ZOO_CONFIGS["swin"])
    path = save_checkpoint(model, "swin", tmp_path)
    loaded = load_zoo_model("swin", checkpoint=path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(v2, v.to(torch.float16).to(v.dtype) if v.is_floating_point() else v)


def _tiny(name: str) -> dict:
    cfg = copy.deepcopy(ZOO_CONFIGS[name])
    if name in ("deit", "simclr"):
        cfg.update(depth=1, embed_dim=32, num_heads=2)
        cfg["stem"]["channels"] = [8, 16, 32, 32]
    elif name == "swin":
        cfg.update(embed_dim=16, depths=[1, 1], num_heads=[1, 2])
        cfg["stem"]["channels"] = [8, 8, 16, 16]
    elif name == "clip":
        cfg["vision_cfg"].update(layers=1, width=32, head_width=16)
        cfg["image_stem"]["channels"] = [8, 8, 16, 32]
        cfg["text_cfg"].update(layers=1, width=32, heads=2)
        cfg["embed_dim"] = 16
    return cfg


@pytest.mark.parametrize(
    "name,objective,extra,steps",
    [
        ("deit", "supervised", {}, 3),
        ("swin", "supervised", {"distill_from": "deit", "kd_weight": 1.0, "distill_weight": 0.0}, 3),
        ("simclr", "simclr", {}, 3),
        ("simclr", "dino", {"dino_prototypes": 32}, 3),  # the architecture of zoo:simclr, DINO's objective
        ("simclr", "dino", {"dino_prototypes": 32, "dino_head_bn": True, "dino_local_backgrounds": "new"}, 3),
        ("deit", "planted", {"planted": {"color": ["L0.H0"], "shape": ["L0.H1"]}}, 3),
        # 96 scenes over 5 backgrounds: runs of 8 sharing a background, leftovers dropped -> 2 batches
        ("simclr", "simclr", {"group_by": (("background",),), "group_size": 8}, 2),
        ("clip", "clip", {"distill_from": "deit", "kd_weight": 1.0}, 3),
    ],
)
def test_few_step_training(name, objective, extra, steps):
    cfg = _tiny(name)
    recipe = Recipe(objective, epochs=1, n_train=96, batch_size=32, warmup_steps=1, lr=3e-3, gray_p=0.5, **extra)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_model(name, cfg).state_dict().items()}
    teacher = build_model("deit", _tiny("deit")).eval() if recipe.distill_from else None
    logs = []
    model, record = train(name, recipe=recipe, config=cfg, progress=False, teacher=teacher, log=logs.append)
    assert record["steps"] == steps and len(record["history"]) == 1
    assert np.isfinite(record["history"][0]["loss"])
    after = model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 3
    assert any("epoch 1" in m for m in logs)
    # reproducible: the same recipe gives the same weights
    torch.manual_seed(0)
    model2, _ = train(name, recipe=recipe, config=cfg, progress=False, teacher=teacher, log=lambda m: None)
    k = next(k for k in changed)
    torch.testing.assert_close(model2.state_dict()[k], after[k])


def test_grouped_epoch_order_runs_share_the_grouped_attributes():
    from vitdecomp.zoo.data import epoch_order, group_keys

    s = make_scenes(1200, seed=5)
    groupings = (("color", "background"), ("shape", "background"))
    recipe = Recipe("simclr", epochs=1, n_train=1200, batch_size=32, group_by=groupings, group_size=4)
    keys = group_keys(s, recipe.group_by)
    assert keys.shape == (2, 1200) and len(np.unique(keys[0])) == len(np.unique(keys[1])) == 30
    order = epoch_order(1200, torch.Generator().manual_seed(0), keys, recipe.group_size).numpy()
    assert len(set(order.tolist())) == len(order)  # no scene twice
    runs = order.reshape(-1, 4)
    shares = [(keys[i][runs] == keys[i][runs[:, :1]]).all(1) for i in range(2)]
    assert (shares[0] | shares[1]).all()  # each run of 4 shares colour+background or shape+background
    by_color, by_shape = shares[0] & ~shares[1], shares[1] & ~shares[0]
    assert abs(int(by_color.sum()) - int(by_shape.sum())) < 0.2 * len(runs)  # the groupings split the epoch
    assert len(np.unique(keys[0][runs[by_color, 0]])) > 20  # and the runs mix the combinations
    dropped = 1200 - len(order)  # at most group_size - 1 scenes per combination and grouping
    assert 0 <= dropped <= 2 * 30 * 3
    again = epoch_order(1200, torch.Generator().manual_seed(0), keys, recipe.group_size).numpy()
    np.testing.assert_array_equal(order, again)


def test_soft_label_loss_is_zero_only_for_matching_logits():
    from vitdecomp.zoo.objectives import soft_label_loss

    t = torch.randn(5, NUM_LOGITS)
    assert soft_label_loss(t, t, 2.0).abs().item() < 1e-6
    # a constant shift inside each attribute's slice leaves its softmax unchanged
    assert soft_label_loss(t + 3.0, t, 2.0).abs().item() < 1e-5
    assert soft_label_loss(torch.randn(5, NUM_LOGITS), t, 2.0).item() > 1e-3


@pytest.mark.parametrize("failing", ["simclr", "deit"])
def test_parallel_training_waits_for_teachers_and_stops_students_of_failures(tmp_path, failing):
    import argparse
    import sys

    from vitdecomp.commands.zoo import TRAIN_ORDER, _train_parallel
    from vitdecomp.zoo.recipes import RECIPES

    stamp = tmp_path / "order.txt"

    def fake(name, args, out):
        code = (
            f"import time; open({str(stamp)!r}, 'a').write('start {name}\\n'); time.sleep(0.3); "
            f"print('{name} epoch 1/1: 100%'); open({str(stamp)!r}, 'a').write('end {name}\\n'); "
            f"raise SystemExit(3 if {name!r} == {failing!r} else 0)"
        )
        return [sys.executable, "-c", code]

    args = argparse.Namespace(jobs=2, threads=None, no_eval=True)
    assert _train_parallel(list(TRAIN_ORDER), args, tmp_path, command=fake, poll=0.05) == 1
    events = stamp.read_text().split("\n")
    students = [n for n in TRAIN_ORDER if RECIPES[n].distill_from == "deit"]
    assert students, "some zoo model distils from deit"
    for student in students:
        if failing == "deit":
            assert f"start {student}" not in events  # never started: its teacher failed
        else:
            assert events.index(f"start {student}") > events.index("end deit")
    started = [e.split()[1] for e in events if e.startswith("start")]
    running, most = 0, 0
    for e in events:
        running += e.startswith("start") - e.startswith("end")
        most = max(most, running)
    assert most == 2, "never more than --jobs trainings at once, and both slots used"
    assert len(started) == len(TRAIN_ORDER) - (len(students) if failing == "deit" else 0)
    assert (tmp_path / "zoo-logs" / "deit.log").read_text().strip() == "deit epoch 1/1: 100%"


def test_resume_check_follows_recipe_weights_and_teacher(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict

    from vitdecomp.models.loaded import file_digest
    from vitdecomp.zoo import cards as zc
    from vitdecomp.zoo.freshness import is_up_to_date
    from vitdecomp.zoo.recipes import RECIPES

    weights, cards = tmp_path / "weights", tmp_path / "cards"
    model = build_model("deit", _tiny("deit"))
    path = zc.save_checkpoint(model, "deit", weights)

    card = {
        "config": ZOO_CONFIGS["deit"],
        "training": {"recipe": asdict(RECIPES["deit"])},
        "weights": {"sha256_16": file_digest(path)},
    }
    zc.write_card("deit", card, cards)
    assert is_up_to_date("deit", weights, cards)
    # a card written before a recipe field existed still matches while the field holds its default
    recorded = card["training"]["recipe"]
    older = {k: v for k, v in recorded.items() if k != "planted"}
    zc.write_card("deit", {**card, "training": {"recipe": older}}, cards)
    assert is_up_to_date("deit", weights, cards)
    zc.write_card("deit", {**card, "training": {"recipe": {**recorded, "planted": {"color": ["L0.H0"]}}}}, cards)
    assert not is_up_to_date("deit", weights, cards)
    zc.write_card("deit", card, cards)
    card["training"]["recipe"]["epochs"] += 1
    zc.write_card("deit", card, cards)
    assert not is_up_to_date("deit", weights, cards)
    card["training"]["recipe"]["epochs"] -= 1
    zc.write_card("deit", card, cards)
    path.write_bytes(path.read_bytes() + b" ")  # weights changed after the card was written
    assert not is_up_to_date("deit", weights, cards)
    # a student is stale once its teacher's weights change
    zc.save_checkpoint(model, "deit", weights)
    zc.save_checkpoint(model, "swin", weights)  # any file: only digests are compared
    student = {
        "config": ZOO_CONFIGS["swin"],
        "training": {"recipe": asdict(RECIPES["swin"]), "distill_teacher": f"zoo:deit@{file_digest(path)}"},
        "weights": {"sha256_16": file_digest(weights / "swin.safetensors")},
    }
    zc.write_card("swin", student, cards)
    assert is_up_to_date("swin", weights, cards)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    zc.save_checkpoint(model, "deit", weights)
    assert not is_up_to_date("swin", weights, cards)
    assert json.loads((cards / "swin.json").read_text())["config"]["family"] == "timm.SwinTransformer"


def test_grouped_epoch_order_skips_combinations_smaller_than_a_run():
    from vitdecomp.zoo.data import epoch_order, group_keys

    s = make_scenes(40, seed=5)
    keys = group_keys(s, (("shape", "color", "background"),))  # 180 combinations: most hold 0 or 1 scene
    order = epoch_order(40, torch.Generator().manual_seed(0), keys, group_size=2).numpy()
    runs = order.reshape(-1, 2)
    assert (keys[0][runs] == keys[0][runs[:, :1]]).all()


#: The zoo's modules from the bottom up: each may import only the ones before it.
ZOO_LAYERS = ("recipes", "models", "data", "cards", "hub", "freshness", "evaluate", "objectives", "train")


def _project_imports(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitdecomp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vitdecomp"))
    return found


def test_zoo_layers_import_only_downwards_and_never_the_model_loader():
    from pathlib import Path

    import vitdecomp.zoo

    zoo_dir = Path(vitdecomp.zoo.__file__).parent
    assert {p.stem for p in zoo_dir.glob("*.py")} == {*ZOO_LAYERS, "__init__"}
    for i, layer in enumerate(ZOO_LAYERS):
        imports = _project_imports(zoo_dir / f"{layer}.py")
        assert "vitdecomp.models.loading" not in imports and "vitdecomp.models" not in imports, layer
        above = {f"vitdecomp.zoo.{m}" for m in ZOO_LAYERS[i:]} | {"vitdecomp.zoo"}
        assert not imports & above, f"zoo.{layer} imports {sorted(imports & above)} (its own layer or above)"


def test_dino_crops_keep_the_object_inside():
    from vitdecomp.zoo.objectives import object_crops, object_geometry

    s = make_scenes(64, seed=13)
    obj = object_geometry(s)
    masks = torch.from_numpy(s.masks).float()[:, None].expand(-1, 3, -1, -1).contiguous()  # [N, 3, 64, 64]
    g = torch.Generator().manual_seed(0)
    for factor in (1.15, 1.6, 2.0):  # local crops: half-side = factor x the object's radius
        crops = object_crops(masks, obj, factor * obj[:, 2], g)[:, 0] > 0.5  # [N, 64, 64]
        # the object is whole: its area grows by the zoom (1 / half-side)
        expected = masks[:, 0].sum((1, 2)) / (factor * obj[:, 2]) ** 2
        torch.testing.assert_close(crops.sum((1, 2)).float(), expected, rtol=0.12, atol=8)
    big = object_crops(masks, obj, torch.full((64,), 0.8), g)[:, 0] > 0.5  # global crops, 64 % of the area
    assert (big.sum((1, 2)).float() >= 0.95 * masks[:, 0].sum((1, 2)) / 0.64).all()


def test_dino_diagnostics_tell_uniform_from_collapsed_teachers():
    from vitdecomp.zoo.objectives import Dino

    recipe = Recipe("dino", epochs=1, n_train=32, batch_size=16, dino_prototypes=16)
    torch.manual_seed(0)
    d = Dino(recipe, build_model("simclr", _tiny("simclr")), {}, make_scenes(32, seed=3))
    k = recipe.dino_prototypes
    head = d.teacher["head"]
    e = torch.randn(recipe.dino_bottleneck)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.copy_(e)  # every image's bottleneck output is e
        head.last.parametrizations.weight.original1.copy_(e.expand(k, -1))  # every prototype alike
    diag = d.diagnostics()
    assert abs(diag["teacher_entropy"] - np.log(k)) < 1e-4 and abs(diag["kl_to_uniform"]) < 1e-4
    assert diag["center_norm"] == 0  # no training step yet
    with torch.no_grad():
        head.last.parametrizations.weight.original1[1:].copy_(-e)  # prototype 0 wins for every image
    diag = d.diagnostics()
    assert diag["prototypes_used"] == 1 and diag["teacher_entropy"] < 1e-3 and diag["kl_to_uniform"] > np.log(k) - 1e-3


def test_simclr_is_the_renamed_self_supervised_model_and_up_to_date():
    from vitdecomp.zoo.cards import read_card
    from vitdecomp.zoo.freshness import is_up_to_date

    card = read_card("simclr")
    assert card["name"] == "simclr" and card["training"]["recipe"]["objective"] == "simclr"
    assert is_up_to_date("simclr")  # its card's digest, recipe and config match the shipped weights
