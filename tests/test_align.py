"""CompAlign: linearity, recovery of planted maps, the orthogonality penalty, save/load refusal; the
aligner cache: keyed by the image set and the training options, an untrained aligner never cached."""

from __future__ import annotations

import pytest
import torch

from vitdecomp.align import (
    Aligner,
    aligned_component,
    aligned_stack,
    apply,
    evaluate,
    identity_aligner,
    load_aligner,
    orthogonality_penalty,
    save_aligner,
    train_aligner,
)
from vitdecomp.aligner_cache import aligner_dir
from vitdecomp.errors import MismatchError
from vitdecomp.store import StoreKey, open_store

C, D, E = 4, 6, 8  # components, model width, CLIP width
NAMES = ["init", "L0.H0", "L0.H1", "L0.mlp"]


def key(**over) -> StoreKey:
    return StoreKey(**{**dict(model="toy", clip="clip", labels=NAMES, start_layer=0, preprocess="p"), **over})


def planted(n: int, isometric: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if isometric:
        w = torch.linalg.qr(torch.randn(C, E, D, generator=g)).Q  # [C, E, D], W_i^T W_i = I
    else:
        w = torch.randn(C, E, D, generator=g) * torch.linspace(0.3, 3.0, D)
    c = torch.randn(n, C, D, generator=g) + 0.5 * torch.randn(1, C, D, generator=g)
    z = torch.einsum("ncd,ced->ne", c, w)
    return c, z, w


def random_aligner(mode: str = "compalign") -> Aligner:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(C if mode == "compalign" else 1, E, D, generator=g)
    return Aligner(w, torch.randn(E, generator=g), NAMES, mode=mode)


def test_linearity_compalign():
    a = random_aligner()
    c = torch.randn(5, C, D)
    out = apply(a, c)
    assert out.shape == (5, C, E)
    per_component = torch.stack([c[:, i] @ a.weight[i].T for i in range(C)], 1)
    torch.testing.assert_close(out, per_component)
    torch.testing.assert_close(out.sum(1) + a.bias, a.apply_sum(c))
    c2 = torch.randn(5, C, D)
    torch.testing.assert_close(apply(a, 2 * c + c2), 2 * out + apply(a, c2), rtol=1e-5, atol=1e-5)


def test_linearity_shared_map_equals_map_of_whole():
    a = random_aligner("shared")
    c = torch.randn(5, C, D)
    torch.testing.assert_close(apply(a, c).sum(1), c.sum(1) @ a.weight[0].T, rtol=1e-5, atol=1e-5)


def test_identity_aligner():
    a = identity_aligner(NAMES, D)
    c = torch.randn(3, C, D)
    assert torch.equal(apply(a, c), c)
    with pytest.raises(MismatchError):
        apply(a, torch.randn(3, C + 1, D))


def test_training_from_store_recovers_planted_maps(tmp_path):
    c, z, w = planted(1200)
    store = open_store(tmp_path, key())
    for s in range(0, len(c), 300):
        store.append([str(i) for i in range(s, s + 300)], c[s : s + 300], c[s : s + 300].sum(1), z[s : s + 300])
    a = train_aligner(store, lr=1e-2, batch_size=128, max_steps=1200, eval_every=50, patience=6, progress=False)
    assert a.key == store.key.to_dict() and a.labels == NAMES
    assert a.metrics["val_cosine"] > 0.99
    c_new, z_new, _ = planted(200, seed=0)  # same maps, new images
    c_new = torch.randn_like(c_new)
    z_new = torch.einsum("ncd,ced->ne", c_new, w)
    assert evaluate(a, (c_new, z_new))["cosine"] > 0.99
    # each component lands where its planted map sends it (the penalty fixes the scale)
    got, want = apply(a, c_new), torch.einsum("ncd,ced->nce", c_new, w)
    per_comp = torch.nn.functional.cosine_similarity(got, want, dim=-1).mean(0)
    assert (per_comp > 0.95).all(), per_comp
    # streaming helpers agree with the batched apply
    torch.testing.assert_close(aligned_stack(store, a)[:, 2], aligned_component(store, a, 2))
    # the single shared map cannot fit distinct per-component maps: the paper's ablation order
    shared = train_aligner(store, mode="shared", lr=1e-2, batch_size=128, max_steps=600, progress=False)
    assert shared.metrics["val_cosine"] < a.metrics["val_cosine"] - 0.05


def test_orthogonality_penalty_reduces_deviation_from_isometry():
    c, z, _ = planted(800, isometric=False)
    kw = dict(lr=1e-2, batch_size=128, max_steps=150, eval_every=150, progress=False)
    free = train_aligner((c, z), NAMES, lam=0.0, **kw)
    reg = train_aligner((c, z), NAMES, lam=1.0, **kw)
    pen_free = orthogonality_penalty(free.weight).mean().item()
    pen_reg = orthogonality_penalty(reg.weight).mean().item()
    assert pen_reg < 0.5 * pen_free, (pen_reg, pen_free)
    assert reg.metrics["orthogonality"] < free.metrics["orthogonality"]


def test_orthogonality_penalty_formula():
    w = torch.randn(3, E, D)
    want = torch.stack([(wi.T @ wi - torch.eye(D)).square().sum() for wi in w])
    torch.testing.assert_close(orthogonality_penalty(w), want, rtol=1e-4, atol=1e-4)
    wide = torch.randn(2, D, E)  # d_clip < D: the small-Gram identity must still hold
    want = torch.stack([(wi.T @ wi - torch.eye(E)).square().sum() for wi in wide])
    torch.testing.assert_close(orthogonality_penalty(wide), want, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_refusal(tmp_path):
    a = random_aligner()
    a.key, a.metrics = key(images="set-A").to_dict(), {"val_cosine": 0.5}
    path = save_aligner(a, aligner_dir(tmp_path, key()))
    b = load_aligner(path, key=key(images="set-B"), labels=NAMES)  # another image set: fine
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert b.labels == NAMES and b.mode == "compalign" and b.metrics == {"val_cosine": 0.5}
    c = torch.randn(2, C, D)
    torch.testing.assert_close(apply(a, c), apply(b, c))
    with pytest.raises(MismatchError, match="component layout"):
        load_aligner(path, labels=NAMES[::-1])
    with pytest.raises(MismatchError, match="different setting"):
        load_aligner(path, key=key(model="other-model"))
    with pytest.raises(MismatchError, match="different setting"):
        load_aligner(path, key=key(start_layer=2))
    assert aligner_dir(tmp_path, key()) != aligner_dir(tmp_path, key(clip="other-clip"))
    assert aligner_dir(tmp_path, key()) == aligner_dir(tmp_path, key(images="set-B"))


def test_ablation_helper_trains_the_three_variants():
    from vitdecomp.align import train_ablation

    c, z, _ = planted(300)
    out = train_ablation((c, z), NAMES, lr=1e-2, batch_size=64, max_steps=60, progress=False)
    assert list(out) == ["shared", "lambda=0", "compalign"]
    assert out["shared"].mode == "shared" and out["shared"].weight.shape == (1, E, D)
    assert out["lambda=0"].lam == 0.0 and out["compalign"].lam == 1.0
    assert out["shared"].metrics["val_cosine"] < out["compalign"].metrics["val_cosine"]


# ------------------------------------------------------------------ the aligner cache


def test_aligner_cache_is_keyed_by_image_set_and_training_options():
    from vitdecomp.aligner_cache import aligner_cache_dir
    from vitdecomp.store import StoreKey

    key = StoreKey("m", "c", ("init",), 0, "p", "images-A")
    opts = {"val_fraction": 0.1, "max_steps": 50, "batch_size": 256}
    base = aligner_cache_dir("/r", key, 1.0, opts)
    assert base == aligner_cache_dir("/r", key, 1.0, dict(opts))
    assert base != aligner_cache_dir("/r", StoreKey("m", "c", ("init",), 0, "p", "images-B"), 1.0, opts)
    assert base != aligner_cache_dir("/r", key, 1.0, {**opts, "max_steps": 1500})
    assert base != aligner_cache_dir("/r", key, 0.5, opts)


def test_untrained_aligner_is_never_cached(tmp_path):
    from vitdecomp.aligner_cache import AlignOptions, get_aligner
    from vitdecomp.store import ArrayRows, StoreKey

    key = StoreKey("m", "c", ("a", "b"), 0, "p", "imgs")
    rows = ArrayRows(torch.randn(20, 2, 4), torch.randn(20, 3), labels=["a", "b"], key=key)
    stage = get_aligner(rows, tmp_path, AlignOptions(max_steps=0), progress=False, log=lambda *a: None)
    assert stage.state == "untrained" and stage.path is None and not list(tmp_path.iterdir())


def test_progress_bar_ends_where_early_stopping_ends_training(capsys):
    """After early stopping the bar shows the steps run out of as many (``n/n``), not ``n/max_steps``."""
    c, z, _ = planted(300)
    a = train_aligner((c, z), NAMES, lr=1e-9, batch_size=64, max_steps=500, eval_every=5, patience=2, min_delta=1.0)
    steps = a.metrics["steps"]
    assert a.metrics["stopped"] == "early_stopped" and steps < 500
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "early-stopped" in last and f"{steps}/{steps}" in last and "100%" in last
