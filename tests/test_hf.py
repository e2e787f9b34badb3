"""``hf:`` names: transformers vision towers from folders the tests write themselves (``save_pretrained``
plus the image processor's config), the offline error for a Hub name, and ``analyze`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import vitdecomp as vd
from vitdecomp.errors import CheckpointError, UsageError, WeightsUnavailableError
from vitdecomp.models.loading import check_name

SMALL = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96}


def _clip_folder(path, seed: int = 0):
    """A random-init CLIP image tower with projection and its image processor, saved as the Hub has them."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8, projection_dim=24)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(path)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    return model


def test_a_save_pretrained_folder_loads_with_its_own_image_processor(tmp_path):
    source = _clip_folder(tmp_path / "m")
    loaded = vd.load_model(f"hf:{tmp_path / 'm'}")
    assert type(loaded.model) is transformers.CLIPVisionModelWithProjection and loaded.source == "transformers"
    assert "@file:" in loaded.weights_id and loaded.image_size == (32, 32)
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    x = loaded.preprocess(image)[None]
    expected = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "m")(images=image, return_tensors="pt")
    torch.testing.assert_close(x, expected["pixel_values"], rtol=0, atol=0)  # the processor, not a copy of it
    with torch.no_grad():
        own = source(x).image_embeds
    d = vd.decompose(loaded, x)
    torch.testing.assert_close(d.representation, own, rtol=0, atol=0)
    assert d.error.max() <= 1e-5 and d.meta["representation"] == "image_embeds"
    assert vd.load_model(f"hf:{tmp_path / 'm'}", pretrained=False).weights_id.endswith("@random-init")


def test_a_checkpoint_file_replaces_the_folders_weights(tmp_path):
    _clip_folder(tmp_path / "m", seed=0)
    other = _clip_folder(tmp_path / "other", seed=1)
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    loaded = vd.load_model(f"hf:{tmp_path / 'm'}", checkpoint=weights)
    for name, p in other.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], p, rtol=0, atol=0)
    assert "@file:" in loaded.weights_id


def test_an_uncached_hub_name_offline_fails_at_once_in_one_line(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked although the repository is not cached")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(WeightsUnavailableError) as err:
        vd.load_model("hf:some-org/some-vit-not-cached")
    message = str(err.value)
    assert "\n" not in message
    assert "'some-org/some-vit-not-cached'" in message and "offline" in message
    assert "hf:/path/to/DIR" in message and "save_pretrained" in message and "--checkpoint" in message


def test_bad_hf_names_are_refused_before_loading(tmp_path):
    for name, match in [
        ("hf:", "empty"),
        (f"hf:{tmp_path / 'missing'}", "no such folder"),
        (f"hf:{tmp_path}", "no config.json"),
        ("hf:not a repo", "hf:ORG/REPO"),
    ]:
        with pytest.raises(UsageError, match=match):
            check_name(name)
    (tmp_path / "m").mkdir()
    transformers.ViTConfig(**SMALL, image_size=32, patch_size=8).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no image processor"):
        vd.load_model(f"hf:{tmp_path / 'm'}", pretrained=False)


def test_analyze_runs_end_to_end_on_a_local_hf_checkpoint(tmp_path, capsys):
    from vitdecomp.cli import main
    from vitdecomp.world import make_scenes

    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=32, patch_size=8)).eval()
    model.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_scenes(8, seed=3).images):
        Image.fromarray(im).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    argv = ["analyze", "--model", f"hf:{tmp_path / 'vit'}", "--clip", "zoo:clip", "--images", str(folder)]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "c"), "--align-steps", "5", "--quiet", "--no-apps"]
    argv += ["--vocabulary", "world", "--threads", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["name"] == f"hf:{tmp_path / 'vit'}" and data["images"]["n"] == 8
    assert data["labels"][0] == "init" and {"L0.H0", "L1.H2", "L1.mlp"} <= set(data["labels"])
    assert data["completeness"]["max_relative_error"] <= 1e-4
