"""Sparse autoencoders on the representation (vitdecomp.sae): the exact split of every latent over the
parts of real upstream models, the published file layouts read as their projects define them, and
training streamed from a store."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitdecomp as vd
from small_models import _clip, _timm
from vitdecomp.errors import CheckpointError, UsageError
from vitdecomp.sae import SparseAutoencoder, check_fits, load_sae, save_sae
from vitdecomp.store import ArrayRows


def random_sae(d: int, n: int = 24, seed: int = 0, **kw) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kw.setdefault("activation", "topk")
    kw.setdefault("k", 5)
    return SparseAutoencoder(t(n, d) / math.sqrt(d), 0.1 * t(n), t(n, d) / math.sqrt(d), 0.1 * t(d), **kw)


@pytest.fixture(scope="module", params=["vit", "clip"])
def parts(request):
    """Contributions ``[B, C, D]`` and the representation of a small real timm ViT / open_clip tower."""
    make = _timm("vit_tiny_patch16_224", 32, img_size=32, depth=2) if request.param == "vit" else _clip(32)
    model, size = make()
    torch.manual_seed(1)
    d = vd.decompose(model, torch.randn(6, 3, size, size))
    return d.contributions, d.representation


NORMS = [
    {"shift": None, "gain": 1.0},
    {"shift": "mean", "gain": 0.37},
    {"input_norm": "layer_norm", "subtract_b_dec": True},
    {"input_norm": "norm_rescale", "subtract_b_dec": True},
]


@pytest.mark.parametrize("norm", NORMS, ids=["plain", "fixed shift and gain", "layer_norm", "norm_rescale"])
def test_every_latent_splits_exactly_over_the_parts(parts, norm):
    """sum_i (part i's term) + constant == the SAE's own pre-activation on the model's representation,
    within 1e-5 relative in float32, for every input normalisation (per-image statistics frozen)."""
    c, r = parts
    kw = dict(norm)
    if kw.get("shift") == "mean":
        kw["shift"] = r.mean(0) + 0.5
    sae = random_sae(r.shape[1], **kw)
    a = sae.pre_activation(r)
    split = sae.split(c, r)
    assert split.shape == (c.shape[0], c.shape[1], sae.n_latents)
    err = (split.sum(1) + sae.constant(r) - a).norm(dim=1) / a.norm(dim=1)
    assert err.max() < 1e-5
    blocks = torch.cat([sae.split(c, r, slice(s, s + 7)) for s in range(0, sae.n_latents, 7)], 2)
    assert torch.allclose(blocks, split, atol=1e-5)


def test_topk_keeps_k_and_the_reconstruction_inverts_the_normalisation():
    sae = random_sae(16, k=3, input_norm="layer_norm")
    r = torch.randn(5, 16) * 3 + 1
    z = sae.encode(r)
    assert ((z > 0).sum(1) <= 3).all() and (z >= 0).all()
    x = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + sae.eps)
    assert torch.allclose(
        sae.decode(z, r), (z @ sae.w_dec + sae.b_dec) * r.std(-1, keepdim=True) + r.mean(-1, keepdim=True)
    )
    assert torch.allclose(sae.pre_activation(r), x @ sae.w_enc.T + sae.b_enc, atol=1e-5)


def test_own_file_round_trip(tmp_path):
    sae = random_sae(12, shift=torch.randn(12), gain=0.5, info={"note": "x"})
    path = save_sae(sae, tmp_path / "sae.safetensors")
    back = load_sae(path)
    r = torch.randn(4, 12)
    assert torch.equal(back.encode(r), sae.encode(r)) and back.gain == 0.5 and back.info == {"note": "x"}


def _state(d: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The tensors saev, Prisma and sae-lens share: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    return {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def _saev_file(path, state, header) -> None:
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)


def test_saev_file_is_read_as_saev_encodes(tmp_path):
    """saev: a JSON header line, then torch.save(state_dict); W_enc [d_model, d_sae]; h = x W_enc + b_enc."""
    d, n = 10, 30
    state, g = _state(d, n, 0), torch.Generator().manual_seed(10)
    header = {"schema": 5, "cfg": {"d_model": d, "d_sae": n, "activation": {"cls": "TopK", "params": {"top_k": 4}}}}
    _saev_file(tmp_path / "sae.pt", state, header)
    sae = load_sae(tmp_path / "sae.pt")
    x = torch.randn(7, d, generator=g)
    h = x @ state["W_enc"] + state["b_enc"]
    assert sae.source == "saev" and sae.k == 4
    assert torch.allclose(sae.pre_activation(x), h, atol=1e-5)
    z = sae.encode(x)
    assert torch.allclose(sae.decode(z, x), z @ state["W_dec"] + state["b_dec"], atol=1e-5)
    legacy = {"d_vit": d, "exp_factor": 3}  # pre-schema files: the header is the config, ReLU
    _saev_file(tmp_path / "old.pt", state, legacy)
    assert torch.allclose(load_sae(tmp_path / "old.pt").encode(x), torch.relu(h), atol=1e-5)


@pytest.mark.parametrize("layout", ["prisma", "sae-lens"])
def test_prisma_and_sae_lens_folders_are_read_as_they_encode(tmp_path, layout):
    """config.json (Prisma) / cfg.json (sae-lens) beside the weights: x -> layer_norm(x) - b_dec ->
    W_enc [d_in, d_sae] + b_enc -> top k, ReLU; decode: + b_dec, then the norm undone."""
    d, n = 8, 20
    state, g = _state(d, n, 1), torch.Generator().manual_seed(11)
    cfg = {"d_in": d, "d_sae": n, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}
    cfg |= {"normalize_activations": "layer_norm", "hook_point": "blocks.11.hook_resid_post"}
    config, weights = (
        ("config.json", "weights.safetensors") if layout == "prisma" else ("cfg.json", "sae_weights.safetensors")
    )
    (tmp_path / config).write_text(json.dumps(cfg))
    save_file(state, str(tmp_path / weights))
    sae = load_sae(tmp_path)
    x = torch.randn(6, d, generator=g) * 2 + 1
    mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    h = ((x - mu) / (sd + 1e-5) - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    top = torch.topk(h, 3, dim=-1)
    z = torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
    assert sae.source == layout and sae.info["hook_point"] == "blocks.11.hook_resid_post"
    assert torch.allclose(sae.encode(x), z, atol=1e-4)
    assert torch.allclose(sae.decode(z, x), (z @ state["W_dec"] + state["b_dec"]) * sd + mu, atol=1e-4)
    assert torch.allclose(load_sae(tmp_path / weights).encode(x), z, atol=1e-4)  # the weights file names it too


class _Pickled:  # what Prisma's published weights.pt pickles beside its tensors (its config class)
    pass


def test_pickled_objects_and_bad_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_in": 4, "activation_fn_str": "relu"}))
    torch.save({"cfg": _Pickled(), "state_dict": {"W_enc": torch.zeros(4, 4)}}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="weights_only") as err:
        load_sae(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "junk.bin").write_bytes(b"not an sae")
    with pytest.raises(UsageError, match="not an SAE"):
        load_sae(tmp_path / "other" / "junk.bin")
    with pytest.raises(UsageError, match="no such file"):
        load_sae(tmp_path / "missing.safetensors")
    with pytest.raises(UsageError, match="12-dim inputs"):
        check_fits(random_sae(12), 96, "the analysed representation")


def test_training_streams_the_representation_from_a_store(tmp_path):
    """Trained from a store in chunks (whole chunks held out; windows of chunks), the SAE reconstructs
    a low-rank representation and only ever reads its representation array."""
    from vitdecomp.sae.training import SaeTrainConfig, default_size, train_sae
    from vitdecomp.store import StoreKey, open_store

    g = torch.Generator().manual_seed(0)
    n, d = 600, 24
    codes = torch.relu(torch.randn(n, 6, generator=g))
    rep = codes @ torch.randn(6, d, generator=g) + 0.01 * torch.randn(n, d, generator=g)
    store = open_store(tmp_path, StoreKey("m", "c", ("a", "b")), chunk_rows=50)
    for s in range(0, n, 50):
        c = torch.stack([rep[s : s + 50] / 2, rep[s : s + 50] / 2], 1)
        store.append([str(i) for i in range(s, s + 50)], c, rep[s : s + 50], torch.zeros(50, 4))
    reads = []
    batch = store.batch
    store.batch = lambda index, arrays=None: reads.append(arrays) or batch(index, arrays)  # type: ignore[method-assign]
    cfg = SaeTrainConfig(steps=300, batch_size=64, window_bytes=50 * d * 4 * 3)
    trained = train_sae(store, cfg, progress=False)
    assert reads and all(a == ("representation",) for a in reads)
    val = trained.split.val
    assert len(val) == 50 and (np.diff(val) == 1).all() and val[0] % 50 == 0  # one whole chunk held out
    assert trained.moments.r99 <= 7 and (trained.sae.n_latents, trained.sae.k) == default_size(d, trained.moments.r99)
    r = rep[torch.from_numpy(val)]
    z = trained.sae.encode(r)
    ev = 1 - (r - trained.sae.decode(z, r)).square().sum() / (r - r.mean(0)).square().sum()
    assert ev > 0.8
    assert (z > 0).sum(1).float().mean() <= trained.sae.k


def test_measure_latents_shares_codes_and_npy(tmp_path):
    """The streamed pass: every latent's part shares sum to 1, its split is exact, the sparse codes
    give back the dense latents, and activations.npy is written block by block as a plain .npy."""
    from vitdecomp.apps.latents import measure_latents

    g = torch.Generator().manual_seed(2)
    c = torch.randn(90, 5, 16, generator=g)
    c[:, 4] = 0.3  # a constant part (a bias): share 0
    rows = ArrayRows(c, representation=c.sum(1), labels=[f"p{i}" for i in range(5)])
    sae = random_sae(16, n=12, k=4)
    held = np.zeros(90, bool)
    held[::3] = True
    m = measure_latents(rows, sae, held, top=3, batch_size=32, progress=False)
    assert np.allclose(m.shares.sum(0), 1, atol=1e-6) and np.abs(m.shares[4]).max() < 1e-9
    assert m.max_error < 1e-5 and m.n_held_out == 30
    z = sae.encode(c.sum(1)).numpy()
    assert np.array_equal(m.codes.dense(), z)
    buf = io.BytesIO()
    m.codes.write_npy(buf, block=7)
    buf.seek(0)
    assert np.array_equal(np.load(buf), z)
    top = np.argsort(-z, 0, kind="stable")[:3].T
    assert np.array_equal(np.sort(m.top_rows, 1), np.sort(top, 1))
    assert np.allclose(m.frequency, (z > 0).mean(0))


def test_whole_map_is_the_aligners_map_of_the_whole():
    from vitdecomp.align import Aligner, whole_map

    g = torch.Generator().manual_seed(3)
    c = torch.randn(200, 3, 6, generator=g)
    rows = ArrayRows(c, labels=["a", "b", "c"])
    assert torch.equal(whole_map(rows, None), torch.eye(6))
    w = torch.randn(1, 4, 6, generator=g)
    assert torch.equal(whole_map(rows, Aligner(w, torch.zeros(4), ["a", "b", "c"], mode="shared")), w[0])
    same = Aligner(w.expand(3, 4, 6).clone(), torch.zeros(4), ["a", "b", "c"])  # every part mapped alike
    assert torch.allclose(whole_map(rows, same, ridge=0.0), w[0], atol=1e-4)
