"""open_clip models built on a timm trunk (``TimmModel``: SigLIP, EVA-02) end to end: `vitdecomp analyze
--model open_clip:ARCH --checkpoint FILE` on a checkpoint the test writes, as a user without the Hub runs it.

The model configs are open_clip's own format, registered with ``open_clip.add_model_config``; their timm
trunks are the real SigLIP / EVA-02 classes made tiny by adding sizes to the ``timm.create_model`` call
open_clip's ``TimmModel`` makes (the same trick as ``small_models._clip_timm``).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitdecomp as vd
from vitdecomp.cli import main
from vitdecomp.errors import UnsupportedModuleError, WeightsUnavailableError

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TRUNK = {"img_size": 64, "patch_size": 16, "depth": 3, "embed_dim": 48, "num_heads": 3}
#: name -> (open_clip config, does it read itself); no "siglip" in a name: open_clip would fetch SigLIP's
#: tokenizer from the Hub for it
CONFIGS = {
    "vd-test-timm-map": (
        {"embed_dim": 48, "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map"}},
        True,
    ),
    "vd-test-timm-eva02": (
        {"embed_dim": 32, "vision_cfg": {"timm_model_name": "eva02_base_patch16_clip_224", "timm_pool": "token"}},
        False,
    ),
}


def _config(name: str) -> dict:
    cfg, _ = CONFIGS[name]
    proj = "none" if cfg["vision_cfg"]["timm_pool"] == "map" else None  # SigLIP / EVA-02 as open_clip ships them
    vision = {"image_size": TRUNK["img_size"], "timm_model_pretrained": False, "timm_proj": proj, **cfg["vision_cfg"]}
    return {**cfg, "vision_cfg": vision, "text_cfg": TEXT, "custom_text": True}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name in CONFIGS:
        (folder / f"{name}.json").write_text(json.dumps(_config(name)))
    (folder / "vd-test-hub-tokenizer.json").write_text(
        json.dumps({**_config("vd-test-timm-map"), "text_cfg": {**TEXT, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}})
    )
    open_clip.add_model_config(folder)
    return folder


@pytest.fixture
def tiny_trunks(monkeypatch):
    """open_clip's ``TimmModel`` builds its trunk with the sizes of :data:`TRUNK` added."""
    create = timm.create_model
    monkeypatch.setattr(open_clip.timm_model.timm, "create_model", lambda n, **kw: create(n, **kw, **TRUNK))


def checkpoint(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analyze_an_open_clip_timm_tower_from_a_local_checkpoint(name, registered, tiny_trunks, tmp_path, capsys):
    ckpt = checkpoint(name, tmp_path)
    model = f"open_clip:{name}"
    reads_itself = CONFIGS[name][1]
    reader = [model, "--clip-checkpoint", str(ckpt)] if reads_itself else ["zoo:clip"]
    out = tmp_path / "out"
    argv = ["analyze", "--model", model, "--checkpoint", str(ckpt), "--clip", *reader, "--n-images", "4"]
    argv += ["--batch-size", "4", "--align-steps", "3", "--no-apps", "--quiet", "--device", "cpu"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["weights_id"].startswith(f"{model}@file:")
    assert data["completeness"]["max_relative_error"] <= 1e-5
    heads = [lab for lab in data["labels"] if ".H" in lab and not lab.startswith("pool")]
    assert len(heads) == TRUNK["depth"] * TRUNK["num_heads"]
    assert data["alignment"]["mode"] == ("identity" if reads_itself else "compalign")


def test_the_loaded_tower_decomposes_to_encode_image(registered, tiny_trunks, tmp_path):
    """The loaded model's parts (the trunk's MAP head split per pool head) add up to its own unnormalised
    ``encode_image``; token rows add up to their heads."""
    loaded = vd.load_model("open_clip:vd-test-timm-map", checkpoint=checkpoint("vd-test-timm-map", tmp_path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    d = vd.decompose(loaded, x, tokens=True)
    assert d.meta["family"] == "open_clip-timm" and d.meta["trunk"] == "timm-vit"
    with torch.no_grad():
        torch.testing.assert_close(d.representation, loaded.model.encode_image(x), rtol=1e-5, atol=1e-6)
    assert d.error.max().item() <= 1e-5 and {"pool_bias", "pool_mlp"} <= set(d.names)
    stack = d.tokens[0]
    idx = d.index([lab.name for lab in stack.labels])
    torch.testing.assert_close(stack.values.sum(2), d.contributions[:, idx], rtol=1e-4, atol=1e-5)


def test_a_hub_tokenizer_offline_is_one_clear_error(registered, tiny_trunks, tmp_path, capsys):
    ckpt = checkpoint("vd-test-timm-map", tmp_path)
    with pytest.raises(WeightsUnavailableError, match=r"timm/ViT-B-16-SigLIP.*local-dir:PATH"):
        vd.load_model("open_clip:vd-test-hub-tokenizer", checkpoint=ckpt)
    argv = ["analyze", "--model", "open_clip:vd-test-hub-tokenizer", "--checkpoint", str(ckpt), "--n-images", "4"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitdecomp: error:") and "timm/ViT-B-16-SigLIP" in err and "\n" not in err


def test_a_non_linear_projection_is_refused_by_path(tiny_trunks):
    vision = {"image_size": 64, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map"}
    model = open_clip.CustomTextCLIP(32, {**vision, "timm_proj": "mlp"}, TEXT).eval()
    with pytest.raises(UnsupportedModuleError, match=r"'head\.mlp'.*Mlp"):
        vd.decompose(model, torch.randn(1, 3, 64, 64))
