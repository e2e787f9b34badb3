"""Directional token maps: exact (equal to projecting the full token contributions) on every family,
and placed on the right pixels."""

from __future__ import annotations

import pytest
import torch

import vitdecomp as vd
from small_models import SMALL_MODELS

NAMES = [n for n in SMALL_MODELS if not n.endswith("-padded")]


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_directional_maps_equal_projected_token_contributions(name):
    """Every head's per-token projection on k directions, pulled back through the readout, equals the
    full per-token contributions projected (Swin's shifted windows and MaxViT's block/grid included);
    per-head directions (as an aligner gives) too."""
    model, size = SMALL_MODELS[name]()
    model = model.double()
    x = _images(size)
    full = vd.decompose(model, x, tokens=True)
    d_out = full.representation.shape[-1]
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    per_head = {
        lab.name: torch.randn(3, d_out, generator=g, dtype=torch.float64) for t in full.tokens for lab in t.labels
    }
    for dirs in (shared, lambda lab: per_head[lab.name]):
        maps = vd.decompose(model, x, token_directions=dirs)
        assert len(maps.tokens) == len(full.tokens)
        for t_full, t_dir in zip(full.tokens, maps.tokens, strict=True):
            assert t_dir.labels == t_full.labels and t_dir.grid_size == t_full.grid_size
            u = torch.stack([shared if isinstance(dirs, torch.Tensor) else per_head[lab.name] for lab in t_full.labels])
            want = torch.einsum("bhnd,hkd->bhnk", t_full.values, u)
            assert t_dir.values.shape == want.shape
            torch.testing.assert_close(t_dir.values, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_projected_token_heatmap_picks_a_direction(tmp_path):
    """``TokenContributions.heatmap`` of values made with ``token_directions`` reads direction ``j``
    by its index (equal to the full values' projection on it); a vector, or a bad index, is refused;
    the mark survives save / load."""
    from vitdecomp.errors import VitDecompError

    model, size = SMALL_MODELS["vit-cls"]()
    model = model.double()
    x = _images(size)
    full = vd.decompose(model, x, tokens=True)
    u = torch.randn(2, full.representation.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    maps = vd.decompose(model, x, token_directions=u)
    t_full, t_dir = full.tokens[0], maps.tokens[0]
    assert t_dir.projected and not t_full.projected
    for j in range(2):
        torch.testing.assert_close(t_dir.heatmap(j), t_full.heatmap(u[j]), rtol=1e-9, atol=1e-12)
    with pytest.raises(VitDecompError, match="projections on 2 directions"):
        t_dir.heatmap(u[0])
    with pytest.raises(VitDecompError):
        t_dir.heatmap(2)
    with pytest.raises(VitDecompError):
        t_full.heatmap(0)
    one = vd.decompose(model, x, token_directions=u[:1]).tokens[0]
    torch.testing.assert_close(one.heatmap(), t_full.heatmap(u[0]), rtol=1e-9, atol=1e-12)
    maps.save(tmp_path / "d")
    assert vd.Decomposition.load(tmp_path / "d").tokens[0].projected


def _single_token_stream(module, token: tuple[int, int] | int):
    """A pre-hook replacing ``module``'s input stream by zeros except one token (NHWC ``(r, c)`` or a
    flat index), a fixed random vector there."""

    def hook(mod, args):
        x = torch.zeros_like(args[0])
        vec = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(3), dtype=x.dtype)
        if isinstance(token, int):
            x[:, token] = vec
        else:
            x[:, token[0], token[1]] = vec
        return (x, *args[1:])

    return module.register_forward_pre_hook(hook)


def _silence_constant_values(attn_module, norm):
    """Zero a norm's beta and the value part of the qkv bias: a zero token then has a zero value."""
    with torch.no_grad():
        norm.bias.zero_()
        d = attn_module.qkv.bias.shape[0] // 3
        attn_module.qkv.bias[2 * d :].zero_()


CASES = {
    # name: (modules whose input becomes one token, layer of their heads, token, stage grid stride)
    "vit-cls": (lambda m: [m.blocks[1]], 1, 1 + 2 * 4 + 3, 8),  # class token first, grid 4x4
    "swin": (lambda m: [m.layers[0].blocks[1]], 1, (5, 6), 2),  # the shifted-window block, 32x32 grid
    "maxvit-tf": (lambda m: [m.stages[0].blocks[0].attn_block, m.stages[0].blocks[0].attn_grid], 0, (3, 6), 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_single_token_lands_on_its_own_pixels(name):
    """Known answer: when the stream entering an attention layer is zero except at one token (and a
    zero token has a zero value), that layer's heads write only from that token, so its map must be
    non-zero exactly on that token's pixels — through Swin's shifted windows and MaxViT's block and
    grid partitions — and hold the heads' whole projected contribution there."""
    from vitdecomp.apps.token_maps import TokenMaps

    modules, layer, token, stride = CASES[name]
    model, size = SMALL_MODELS[name]()
    model = model.double()
    handles = []
    for mod in modules(model):
        inner = getattr(mod, "attn", None)
        _silence_constant_values(inner, mod.norm1)
        handles.append(_single_token_stream(mod, token))
    try:
        x = _images(size, n=1)
        d = vd.decompose(model, x, tokens=[layer], check=0)
        u = torch.randn(2, d.representation.shape[-1], generator=torch.Generator().manual_seed(5), dtype=x.dtype)
        maps = TokenMaps.of(vd.decompose(model, x, tokens=[layer], token_directions=u, check=0), (size, size))
    finally:
        for h in handles:
            h.remove()
    px = maps.pixels()[0]  # [k, H, W]
    if isinstance(token, int):  # class token first, then a row-major grid of stride-sized patches
        gw = size // stride
        r, c = divmod(token - 1, gw)
    else:
        r, c = token
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[r * stride : (r + 1) * stride, c * stride : (c + 1) * stride] = True
    assert (px.abs().sum(0) > 0).equal(expected), "relevance exactly on the token's own pixels"
    heads = d.index(lambda lab: lab.kind == "attn_head" and lab.layer == layer)
    total = d.contributions[:, heads].sum(1) @ u.T  # [1, k]
    torch.testing.assert_close(px.sum((-1, -2)), total[0], rtol=1e-9, atol=1e-9)


def test_maps_go_back_to_the_original_image_through_resize_and_crop():
    """Resize(64) then CenterCrop(64) of a 100 x 80 (H x W) image: the input is rows 8..72 of the
    80 x 64 resize, i.e. rows 10..90 of the original; the total relevance is kept."""
    import torchvision.transforms as T

    from vitdecomp.apps.pixels import input_geometry

    geo = input_geometry(T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor()]), (100, 80))
    assert (geo.resized, geo.offset, geo.crop) == ((80, 64), (8, 0), (64, 64))
    m = torch.ones(1, 64, 64)
    back = geo.to_original(m)[0]
    assert back.shape == (100, 80)
    torch.testing.assert_close(back.sum(), m.sum())
    rows = back.sum(1) > 1e-6
    assert rows.nonzero().min().item() in (9, 10) and rows.nonzero().max().item() in (89, 90)


def test_the_token_map_contract_returns_input_pixels():
    from vitdecomp.apps import DirectionalTokenMap

    model, size = SMALL_MODELS["swin"]()
    x = _images(size).float()
    d = vd.decompose(model, x)
    u = torch.randn(d.representation.shape[-1], generator=torch.Generator().manual_seed(2))
    out = DirectionalTokenMap()(model, x, u)
    assert out.shape == (x.shape[0], size, size)
    heads = d.index(lambda lab: lab.kind == "attn_head")
    torch.testing.assert_close(out.sum((-1, -2)), d.contributions[:, heads].sum(1) @ u, rtol=1e-4, atol=1e-4)
