"""Zero-shot segmentation: the metrics prefer a right map, Chefer's rollout is the hand computation,
GradCAM reads every token layout, and the command runs on an exported world and refuses bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from small_models import SMALL_MODELS
from vitdecomp.apps.chefer import CheferMap, rollout, token_relevance, why_not
from vitdecomp.apps.gradcam import GradCamMap, cam_layer, tokens_to_grid
from vitdecomp.apps.masks import folder_set
from vitdecomp.apps.relevance import Representation
from vitdecomp.apps.seg_metrics import binarize, segmentation_metrics
from vitdecomp.apps.segment import DecompositionMap, choose_targets
from vitdecomp.cli import main
from vitdecomp.errors import VitDecompError
from vitdecomp.world.export import export_world


def _blob(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r**2))


def test_a_map_on_the_object_scores_higher_than_one_off_it():
    """Two synthetic images, the object a disc: a blob on the disc beats the same blob elsewhere on
    every metric; a map equal to the mask is perfect."""
    masks = torch.stack([_blob(32, 10, 10, 5) > 0.3, _blob(32, 20, 22, 6) > 0.3])
    right = torch.stack([_blob(32, 10, 10, 5), _blob(32, 20, 22, 6)])
    wrong = torch.stack([_blob(32, 24, 24, 5), _blob(32, 6, 6, 6)])
    good, bad = segmentation_metrics(right, masks), segmentation_metrics(wrong, masks)
    for name in ("pixel_accuracy", "miou", "cumulative_foreground_iou", "mean_ap"):
        assert getattr(good, name) > getattr(bad, name) + 0.1, name
    perfect = segmentation_metrics(masks.float(), masks)
    assert perfect.miou == perfect.pixel_accuracy == perfect.mean_ap == 1.0


def test_iou_is_dataset_level_per_class_and_the_threshold_is_the_map_mean():
    """Counted by hand: image 1 predicts 2 object pixels (1 right), image 2 predicts 1 (right)."""
    m1 = torch.tensor([[1.0, 0.9, 0.0, 0.0]])  # normalised mean 0.475: pixels 0, 1 are object
    m2 = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    t1, t2 = torch.tensor([[True, False, False, False]]), torch.tensor([[False, False, True, True]])
    assert binarize(torch.stack([m1, m2])).tolist() == [[[True, True, False, False]], [[False, False, False, True]]]
    s = segmentation_metrics(torch.stack([m1, m2]), torch.stack([t1, t2]))
    # object: inter 1 + 1, union 2 + 2; background: inter 2 + 2, union 3 + 3
    assert s.cumulative_foreground_iou == pytest.approx(2 / 4)
    assert s.iou_background == pytest.approx(4 / 6)
    assert s.miou == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert s.pixel_accuracy == pytest.approx(6 / 8)


def test_rollout_equals_the_hand_computation_of_two_one_head_layers():
    """N = 2 tokens, one head: Abar_l = relu(G_l * A_l), R = (I + Abar_2)(I + Abar_1)."""
    a1, g1 = torch.tensor([[0.5, 0.5], [0.2, 0.8]]), torch.tensor([[2.0, -1.0], [1.0, 1.0]])
    a2, g2 = torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([[1.0, 3.0], [-2.0, 0.5]])
    # Abar_1 = [[1, 0], [0.2, 0.8]]; Abar_2 = [[0.9, 0.3], [0, 0.3]]
    # R_1 = I + Abar_1 = [[2, 0], [0.2, 1.8]]; R_2 = R_1 + Abar_2 @ R_1 = [[3.86, 0.54], [0.26, 2.34]]
    r = rollout([a1[None, None], a2[None, None]], [g1[None, None], g2[None, None]])
    assert torch.allclose(r[0], torch.tensor([[3.86, 0.54], [0.26, 2.34]]))


def _by_hand(model: torch.nn.Module, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A two-block timm ViT written out: attention from q, k by hand, gradients by autograd, rollout."""
    t = model.patch_embed(x)
    t = model.norm_pre(model._pos_embed(t))
    attns = []
    for blk in model.blocks:
        a = blk.attn
        b, n, c = t.shape
        qkv = a.qkv(blk.norm1(t)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        attns.append(probs)
        t = t + blk.ls1(a.proj((probs @ v).transpose(1, 2).reshape(b, n, c)))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    rep = model.fc_norm(model.norm(t)[:, 0])
    grads = torch.autograd.grad((rep * u).sum(), attns)
    r = torch.eye(t.shape[1]).expand(len(x), -1, -1)
    for a, g in zip(attns, grads, strict=True):
        r = r + (g * a).clamp_min(0).mean(1) @ r
    return r[:, 0, 1:]


def test_chefer_on_a_two_layer_vit_equals_the_hand_computation():
    model, size = SMALL_MODELS["vit-cls"]()
    model.blocks = model.blocks[:2]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, model.num_features, generator=torch.Generator().manual_seed(1))
    fused = [blk.attn.fused_attn for blk in model.blocks]
    got = token_relevance(model, x, u)
    assert torch.allclose(got, _by_hand(model, x, u), atol=1e-5)
    assert got.abs().max() > 1e-3  # not trivially zero
    assert [blk.attn.fused_attn for blk in model.blocks] == fused  # the model is left as it was
    assert not any(blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    maps = CheferMap()(model, x, u)
    assert maps.shape == (2, size, size)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("swin", "windowed"),
        ("maxvit-tf", "partitioned"),
        ("vit-noclass", "class token"),
        ("openclip-tok", "nn.MultiheadAttention"),  # global attention and a class token: not the reason
    ],
)
def test_chefer_says_where_it_does_not_apply_and_why(name, reason):
    model, _ = SMALL_MODELS[name]()
    assert reason in why_not(model)
    assert why_not(SMALL_MODELS["vit-cls"]()[0]) is None


def test_segment_notes_state_this_process_threads():
    from vitdecomp.apps.segment import timing_rule

    n = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert f"{threads} torch thread(s)" in timing_rule()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["vit-cls", "dinov2-reg-ls", "swin", "maxvit-tf", "maxvit-rw-nchw", "openclip-tok"])
def test_gradcam_reshape_gives_the_token_grid_for_each_layout(name):
    """The CAM layer's output, reshaped, is ``[B, C, h, w]`` on the model's token grid; GradCAM runs
    and its map responds to the explained direction."""
    model, size = SMALL_MODELS[name]()
    layer = cam_layer(model)
    seen = []
    hook = layer.module.register_forward_hook(lambda _m, _i, out: seen.append(layer.reshape(out)))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rep = Representation(model)(x)
    hook.remove()
    grid = seen[0]
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[2] * grid.shape[3] > 1
    assert grid.shape[2] <= size and grid.shape[3] <= size
    u = torch.randn(2, rep.shape[1], generator=torch.Generator().manual_seed(2))
    a, b = GradCamMap()(model, x, u), GradCamMap()(model, x, -u)
    assert a.shape == (2, size, size) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)


def test_vit_reshape_puts_token_r_c_at_grid_r_c():
    tokens = torch.arange(1 + 6).float().view(1, 7, 1)  # class token, then a 2 x 3 grid
    grid = tokens_to_grid(1, (2, 3))(tokens)
    assert grid[0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_decomposition_map_is_positive_and_lands_on_the_input():
    model, size = SMALL_MODELS["swin"]()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, model.num_features, generator=torch.Generator().manual_seed(1))
    maps = DecompositionMap()(model, x, u)
    assert maps.shape == (2, size, size) and (maps >= 0).all() and (maps > 0).any()
    signed = DecompositionMap(positive="none")(model, x, u)
    assert (signed < 0).any()  # the positive part removed something


def test_targets_predicted_needs_a_classifier_and_self_is_centred():
    model, _ = SMALL_MODELS["vit-cls"]()
    reps = torch.randn(5, model.num_features)
    w = model.head.weight.detach()
    logits = reps @ w.T + model.head.bias.detach()
    t = choose_targets(model, reps, "predicted", contrast="none")
    assert torch.equal(t.directions, w[logits.argmax(1)]) and t.context is None
    # against the expected alternative: the row minus the softmax-weighted other rows, v's share spread evenly
    e = choose_targets(model, reps, "predicted")
    p = logits.softmax(-1)
    v = logits.argmax(1)
    a = p.clone()
    a[torch.arange(5), v] = 0
    a += (p[torch.arange(5), v] / (w.shape[0] - 1))[:, None]
    a[torch.arange(5), v] = 0
    torch.testing.assert_close(e.directions, w[v] - a @ w)
    assert torch.equal(e.context.value, v)
    wrong = choose_targets(model, reps, "wrong", seed=3)
    assert (wrong.context.value != v).all() and torch.equal(
        wrong.context.value, choose_targets(model, reps, "wrong", seed=3).context.value
    )
    s = choose_targets(model, reps, "self")
    assert torch.allclose(s.directions.sum(0), torch.zeros(model.num_features), atol=1e-5)
    model.reset_classifier(0)
    assert choose_targets(model, reps, "auto").rule.startswith("self")
    with pytest.raises(VitDecompError, match="classifier"):
        choose_targets(model, reps, "predicted")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return export_world(6, seed=7100, out_dir=tmp_path_factory.mktemp("w") / "world", progress=False)


def test_cli_on_an_exported_world(world, tmp_path, capsys):
    out = tmp_path / "seg"
    assert main(["segment", "--model", "zoo:deit", "--world", str(world), "--batch", "4", "--out", str(out)]) == 0
    result = json.loads((out / "segment.json").read_text())
    assert [m["name"] for m in result["methods"]] == ["decomposition", "gradcam", "chefer"]
    assert result["n_images"] == 6 and all(m["metrics"]["n_images"] == 6 for m in result["methods"])
    assert all(m["maps_per_s"] > 0 for m in result["methods"])
    assert "--world" in result["command"] and sum(result["targets"].values()) == 6
    assert (out / "segment.png").read_bytes()[:4] == b"\x89PNG"
    assert "| decomposition |" in (out / "metrics.md").read_text()


def test_section_follows_the_report_contract(world, tmp_path):
    from vitdecomp.apps.masks import world_set
    from vitdecomp.apps.segment import segment
    from vitdecomp.models.loading import load_model

    res = segment(load_model("zoo:deit"), world_set(3, 7100), methods=[DecompositionMap()], show=2)
    sec = res.section()
    assert sec.name == "segment" and sec.figures[0].data_uri.startswith("data:image/jpeg;base64,")
    assert sec.rows[0][0] == "decomposition" and len(sec.rows[0]) == len(sec.header)
    assert json.loads(json.dumps(res.to_dict()))["methods"][0]["metrics"]["n_images"] == 3


def _folder(tmp_path, world, n=4):
    images, masks = tmp_path / "im", tmp_path / "mk"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        Image.open(world / "images" / f"{i:06d}.png").save(images / f"pic{i}.png")
        Image.open(world / "masks" / f"{i:06d}.png").save(masks / f"pic{i}.png")
    return images, masks


def test_folder_masks_by_stem_skips_images_without_one_and_resizes_others(world, tmp_path):
    images, masks = _folder(tmp_path, world)
    (masks / "pic3.png").unlink()
    Image.open(world / "masks" / "000001.png").resize((32, 32), Image.NEAREST).save(masks / "pic1.png")
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[10:20, 10:20, 2] = 7  # any non-zero channel is object
    Image.fromarray(rgb).save(masks / "pic2.png")
    data = folder_set(images, masks)
    assert data.names == ["pic0", "pic1", "pic2"] and data.skipped == [str(images / "pic3.png")]
    assert len(data.resized) == 1 and "32x32 -> 64x64" in data.resized[0]
    assert data.masks[1].shape == (64, 64) and data.masks[2].sum() == 100


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "mask .*pic0.png cannot be read"),
        ("no-masks", "has a mask"),
        ("images-only", "--images and --masks go together"),
        ("duplicate", "two masks share the stem 'pic0'"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(case, message, world, tmp_path, capsys):
    images, masks = _folder(tmp_path, world, n=2)
    argv = ["segment", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "o")]
    if case == "unreadable":
        (masks / "pic0.png").write_bytes(b"not a png")
    elif case == "no-masks":
        for p in masks.iterdir():
            p.rename(masks / ("other_" + p.name))
    elif case == "images-only":
        argv = argv[:3] + argv[5:]
    elif case == "duplicate":
        Image.open(masks / "pic0.png").save(masks / "pic0.bmp")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert re.search(message, err), err
