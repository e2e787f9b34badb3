"""timm ``NaFlexVit`` on NaFlex's own input: pre-patchified batches of images of different sizes, padded,
with ``patch_coord`` / ``patch_valid``."""

from __future__ import annotations

import pytest
import torch
from timm.models.naflexvit import batch_patchify

import vitdecomp as vd
from small_models import SMALL_MODELS

PATCH = 8


def naflex_batch(images: list[torch.Tensor], length: int, padding: float = 0.0) -> dict[str, torch.Tensor]:
    """Images ``[3, H, W]`` of any sizes as one NaFlex batch of ``length`` patches each: patches in row-major
    order, then padding patches filled with ``padding`` (``patch_valid`` false, coordinates 0)."""
    patches, coords, valid = [], [], []
    for im in images:
        p, (gh, gw) = batch_patchify(im[None], (PATCH, PATCH))
        n, pad = p.shape[1], length - p.shape[1]
        yx = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)
        patches.append(torch.cat([p[0], torch.full((pad, p.shape[2]), padding, dtype=p.dtype)]))
        coords.append(torch.cat([yx, torch.zeros(pad, 2, dtype=torch.long)]))
        valid.append(torch.arange(length) < n)
    return {"patches": torch.stack(patches), "patch_coord": torch.stack(coords), "patch_valid": torch.stack(valid)}


def own_output(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(**model.forward_features(**batch), pre_logits=True)


@pytest.fixture(params=["naflex-gap-reg", "naflex-map-rope-swiglu"])
def model(request):
    model, _ = SMALL_MODELS[request.param]()
    return model.double()


def sizes(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 32, generator=g, dtype=torch.float64), torch.randn(3, 24, 16, generator=g).double()]


def test_a_padded_patch_batch_decomposes_exactly(model):
    batch = naflex_batch(sizes(), 16, padding=3.0)
    d = vd.decompose(model, batch)
    assert d.error.max().item() <= 1e-12
    torch.testing.assert_close(d.representation, own_output(model, batch), rtol=0, atol=1e-12)
    f32 = vd.decompose(model.float(), {k: v.float() if v.is_floating_point() else v for k, v in batch.items()})
    assert f32.error.max().item() <= 1e-5


def test_padding_contributes_nothing(model):
    """A sample decomposes the same alone and padded with junk in a batch; its padding tokens' rows of
    every head's token split are exactly 0."""
    small = sizes()[1]  # 3 x 2 patches, padded to 16
    batch = naflex_batch(sizes(), 16, padding=3.0)
    padded = vd.decompose(model, batch, tokens=True)
    alone = vd.decompose(model, naflex_batch([small], 6), tokens=True)
    assert padded.names == alone.names
    torch.testing.assert_close(padded.contributions[1], alone.contributions[0], rtol=0, atol=1e-12)
    stack = padded.tokens[0]
    npre = stack.num_prefix_tokens
    assert stack.grid_size == (1, 16) and bool((stack.pixel_boxes == -1).all()), "no 2-D grid for a patch batch"
    assert stack.values[1, :, npre + 6 :].abs().max().item() == 0.0
    idx = padded.index([lab.name for lab in stack.labels])
    torch.testing.assert_close(stack.values.sum(2), padded.contributions[:, idx], rtol=0, atol=1e-12)
    torch.testing.assert_close(stack.values[1, :, : npre + 6], alone.tokens[0].values[0], rtol=0, atol=1e-12)


def test_token_directions_on_a_patch_batch(model):
    batch = naflex_batch(sizes(), 16)
    u = torch.randn(2, model.num_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = vd.decompose(model, batch, tokens=True)
    projected = vd.decompose(model, batch, token_directions=u)
    torch.testing.assert_close(projected.tokens[0].values, full.tokens[0].values @ u.T, rtol=0, atol=1e-12)


def test_non_finite_patches_are_refused_by_batch_position(model):
    batch = naflex_batch(sizes(), 16)
    batch["patches"][1, 0, 0] = float("nan")
    with pytest.raises(vd.errors.NonFiniteInputError, match="batch position 1"):
        vd.decompose(model, batch)
