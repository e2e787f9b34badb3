"""Text embeddings (prompt averaging, disk cache), vocabularies, TextSpan."""

from __future__ import annotations

import pytest
import torch

from vitdecomp.text import (
    DEFAULT_TEMPLATES,
    TextEncoder,
    component_descriptions,
    load_vocabulary,
    normalize,
    text_span,
    vocabulary_names,
)

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_clip():
    """A random-init open_clip CLIP with a 1-layer, 32-wide text tower (builds in ~0.1 s)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    return model, open_clip.get_tokenizer("ViT-B-32", context_length=16)


def direct(model, tok, text, templates):
    with torch.no_grad():
        e = normalize(model.encode_text(tok([t.format(text) for t in templates])).float())
    return normalize(e.mean(0))


def test_prompt_averaging(tiny_clip):
    model, tok = tiny_clip
    enc = TextEncoder(model, tok)
    templates = ("a photo of {}.", "a drawing of {}.", "{} in the wild.")
    got = enc(["red", "a striped cat"], templates)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    for i, text in enumerate(["red", "a striped cat"]):
        torch.testing.assert_close(got[i], direct(model, tok, text, templates), rtol=1e-5, atol=1e-6)
    single = enc(["red"], templates[:1])[0]
    torch.testing.assert_close(single, direct(model, tok, "red", templates[:1]), rtol=1e-5, atol=1e-6)
    assert (single - got[0]).abs().max() > 1e-3  # the average is not just the first template
    with pytest.raises(ValueError, match="template"):
        enc(["red"], ("no placeholder",))


def test_disk_cache(tiny_clip, tmp_path):
    model, tok = tiny_clip
    enc = TextEncoder(model, tok, "tiny@seed0", cache_dir=tmp_path, batch_size=1000)
    first = enc(["red", "blue"])
    assert enc.calls == 1
    assert torch.equal(enc(["blue", "red"]), first[[1, 0]]) and enc.calls == 1  # memory hit
    fresh = TextEncoder(model, tok, "tiny@seed0", cache_dir=tmp_path)
    assert torch.equal(fresh(["red", "blue"]), first) and fresh.calls == 0  # disk hit
    fresh(["red", "green"])  # only the new text is computed
    assert fresh.calls == 1
    again = TextEncoder(model, tok, "tiny@seed0", cache_dir=tmp_path)
    again(["red", "blue", "green"])
    assert again.calls == 0
    # a different template list or different weights never reuse these entries
    other_t = TextEncoder(model, tok, "tiny@seed0", cache_dir=tmp_path)
    other_t(["red"], DEFAULT_TEMPLATES[:2])
    assert other_t.calls == 1
    other_w = TextEncoder(model, tok, "tiny@seed1", cache_dir=tmp_path)
    other_w(["red"])
    assert other_w.calls == 1
    # the cache really returns what the model gives
    torch.testing.assert_close(again(["green"])[0], direct(model, tok, "green", DEFAULT_TEMPLATES))


def test_vocabularies():
    assert {"general", "world"} <= set(vocabulary_names())
    general = load_vocabulary("general")
    assert len(general) >= 300 and len(set(general)) == len(general)
    for word in ("red", "striped", "dog", "beach", "circle", "furry"):
        assert word in general
    assert not any(w.startswith("#") for w in general)
    world = load_vocabulary("world")
    for word in ("circle", "hexagon", "purple", "checkered", "snow"):
        assert word in world
    with pytest.raises(ValueError, match="no vocabulary"):
        load_vocabulary("klingon")


def _planted_vocab(d: int = 16, m: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = normalize(torch.randn(m, d, generator=g))
    t[3] = normalize(t[7] + 0.15 * t[3])  # a near-duplicate of entry 7
    texts = [f"w{i}" for i in range(m)]
    return t, texts, g


def test_text_span_picks_planted_directions_and_projects_them_out():
    t, texts, g = _planted_vocab()
    n = 500
    a, b = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    outputs = 3.0 * a * t[7] + 1.0 * b * t[12] + 0.05 * torch.randn(n, 16, generator=g) + 2.0 * t[20]
    picks = text_span(outputs, t, texts, k=3)
    assert [p.text for p in picks[:2]] == ["w7", "w12"]  # the near-duplicate w3 is not picked second
    assert picks[0].explained > 0.8 and sum(p.explained for p in picks) <= 1.0 + 1e-9
    # without projecting out, the duplicate would have come second (so the test can fail)
    var = ((outputs - outputs.mean(0)) @ t.T).var(0)
    assert var.argsort(descending=True)[1].item() == 3
    # the constant offset along w20 is not variance: it is reported as a projection, not picked
    assert "w20" not in [p.text for p in picks]


def test_component_descriptions_over_aligner():
    from vitdecomp.align import identity_aligner

    t, texts, g = _planted_vocab()
    n = 300
    comp = torch.zeros(n, 3, 16)
    comp[:, 0] = torch.randn(n, 1, generator=g) * t[5]
    comp[:, 1] = torch.randn(n, 1, generator=g) * t[9]
    comp[:, 2] = torch.randn(n, 16, generator=g) * 0.01
    aligner = identity_aligner(["a", "b", "c"], 16)
    out = component_descriptions(comp, aligner, t, texts, k=2, progress=False)
    assert list(out) == ["a", "b", "c"]
    assert out["a"][0].text == "w5" and out["b"][0].text == "w9"
