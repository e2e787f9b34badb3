"""Loading through timm's / open_clip's own mechanisms from checkpoints the tests write themselves."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitdecomp as vd
from vitdecomp.errors import CheckpointError, ImageReadError, WeightsUnavailableError
from vitdecomp.imageset import iter_batches, list_images

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_timm_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    path = tmp_path / "model.safetensors"
    _save(source, path)
    loaded = vd.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY_VIT)
    assert loaded.source == "timm" and "@file:" in loaded.weights_id
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), source(x), rtol=0, atol=0)
    a = vd.decompose(loaded, x)
    b = vd.decompose(source, x)
    torch.testing.assert_close(a.contributions, b.contributions, rtol=0, atol=0)
    # preprocessing comes from timm's data config, not hand-written
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 10, 10))
    assert loaded.preprocess(img).shape == (3, 32, 32)


def test_random_init_weights_differ_from_a_checkpoint(tmp_path):
    a = vd.load_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    assert a.weights_id.endswith("@random-init")


def test_mismatched_timm_checkpoint_is_refused(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "embed_dim": 96})
    path = tmp_path / "wrong.safetensors"
    _save(other, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        vd.load_model("vit_tiny_patch16_224", checkpoint=path, **TINY_VIT)
    with pytest.raises(CheckpointError, match="not found"):
        vd.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.safetensors")


def test_open_clip_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    source = vd.load_model("open_clip:ViT-S-32", pretrained=False)
    path = tmp_path / "open_clip_model.safetensors"
    _save(source.model, path)
    loaded = vd.load_model("open_clip:ViT-S-32", checkpoint=path)
    assert loaded.is_clip and loaded.tokenizer is not None
    x = torch.randn(1, 3, *loaded.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(x), source.model.encode_image(x), rtol=0, atol=0)
    d = vd.decompose(loaded, x)
    assert d.representation.shape[-1] == loaded.model.visual.output_dim
    assert d.error.max() < 1e-5


def test_offline_pretrained_weights_give_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="checkpoint="):
        vd.load_model("vit_tiny_patch16_224", pretrained=True)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        vd.load_model("not_a_model_at_all")
    with pytest.raises(ValueError, match="open_clip"):
        vd.load_model("open_clip:NoSuchArch/x")


def test_image_folder_reading_names_bad_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.jpg"]

    def prep(im):
        return torch.zeros(3, 4, 4)

    with pytest.raises(ImageReadError, match=r"b\.jpg"):
        list(iter_batches(paths, prep, batch_size=4))
    batches = list(iter_batches(paths, prep, batch_size=4, skip_bad=True))
    assert [len(ids) for ids, _ in batches] == [1]
    with pytest.raises(ImageReadError, match="not a folder"):
        list_images(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no images"):
        list_images(tmp_path / "empty")


def test_local_dir_names_load_through_timm_and_are_keyed_by_their_weights(tmp_path):
    from timm.models._hub import save_for_hf

    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    save_for_hf(source, tmp_path / "m")
    loaded = vd.load_model(f"local-dir:{tmp_path / 'm'}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), source(x), rtol=0, atol=0)
    assert "@file:" in loaded.weights_id  # a changed folder is another cache key
    from vitdecomp.models.loading import check_name

    with pytest.raises(ValueError, match="no such folder"):
        check_name(f"local-dir:{tmp_path / 'missing'}")
