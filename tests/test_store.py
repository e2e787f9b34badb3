"""The contribution store: exact round trip, resume after interruption, key refusal (the zarr
layout itself, foreign readers, URLs and concurrent writers: tests/test_zarr_store.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from vitdecomp.components import ComponentLabel, Decomposition
from vitdecomp.errors import MismatchError
from vitdecomp.pipeline.fill import fill_store
from vitdecomp.store import ArrayRows, ContributionStore, StoreKey, open_store, store_dir

C, D, K = 5, 6, 4
LABELS = [
    ComponentLabel("init"),
    *(ComponentLabel("attn_head", 0, h) for h in range(3)),
    ComponentLabel("mlp", 0),
]
NAMES = [lab.name for lab in LABELS]


def make_key(**over) -> StoreKey:
    base = dict(model="toy@random-init", clip="clip@random-init", labels=NAMES, start_layer=0, preprocess="p")
    return StoreKey(**{**base, **over})


def fake_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def decompose_fn(images: torch.Tensor) -> Decomposition:
    """Deterministic per-image 'decomposition' of a [B, 3] image tensor."""
    basis = torch.arange(C * D * 3, dtype=torch.float32).reshape(C, D, 3).sin()
    contrib = (basis[None] * images[:, None, None, :]).sum(-1)  # batch-size independent rounding
    return Decomposition(contrib, LABELS, contrib.sum(1))


def clip_fn(images: torch.Tensor) -> torch.Tensor:
    return torch.cat([images, images[:, :1] ** 2], 1)


def batches(images: torch.Tensor, bs: int):
    for s in range(0, len(images), bs):
        yield [f"img{i:04d}" for i in range(s, min(s + bs, len(images)))], images[s : s + bs]


def test_round_trip_exact(tmp_path):
    imgs = fake_images(23)
    store = fill_store(open_store(tmp_path, make_key()), batches(imgs, 5), decompose_fn, clip_fn, progress=False)
    again = ContributionStore(store.path)  # fresh object: reads from disk
    dec = decompose_fn(imgs)
    assert len(again) == 23
    assert again.ids == [f"img{i:04d}" for i in range(23)]
    assert again.labels == NAMES
    assert np.array_equal(np.asarray(again.contributions), dec.contributions.numpy())
    assert np.array_equal(np.asarray(again.representation), dec.representation.numpy())
    assert np.array_equal(np.asarray(again.clip), clip_fn(imgs).numpy())
    b = again.batch([7, 2])
    assert torch.equal(b["contributions"], dec.contributions[[2, 7]])
    rows = torch.cat([x["clip"] for x in again.iter_batches(4)])
    assert torch.equal(rows, clip_fn(imgs))
    header = json.loads((store.path / "zarr.json").read_text())["attributes"]["vitdecomp"]
    assert header["key"]["labels"] == NAMES and again.shapes == {
        "contributions": (C, D),
        "representation": (D,),
        "clip": (K,),
    }
    whole = again.in_memory().batch(slice(None))
    assert torch.equal(whole["contributions"], dec.contributions) and torch.equal(whole["clip"], clip_fn(imgs))
    nbytes = 23 * (C * D + D + K) * 4  # what in_memory holds: float32 rows
    assert again.in_memory(max_bytes=nbytes) is not None and again.in_memory(max_bytes=nbytes - 1) is None


def test_float16_option(tmp_path):
    imgs = fake_images(9)
    store = fill_store(
        open_store(tmp_path, make_key(), dtype="float16"),
        batches(imgs, 4),
        decompose_fn,
        clip_fn,
        progress=False,
    )
    assert store.contributions.dtype == np.float16
    want = decompose_fn(imgs).contributions.half().numpy()
    assert np.array_equal(np.asarray(store.contributions), want)
    assert torch.equal(store.batch(slice(None))["contributions"], torch.from_numpy(want).float())
    assert store.path != store_dir(tmp_path, make_key(), "float32")  # a different dtype is a different store


def test_bfloat16_is_stored_as_its_bits_and_read_back_exactly(tmp_path):
    """zarr has no bfloat16: the store keeps its uint16 bit pattern and says so in an attribute."""
    imgs = fake_images(9)
    store = fill_store(
        open_store(tmp_path, make_key(), dtype="bfloat16"), batches(imgs, 4), decompose_fn, clip_fn, progress=False
    )
    want = decompose_fn(imgs).contributions.bfloat16()
    assert store.contributions.dtype == np.uint16 and store.contributions.attrs["vitdecomp_dtype"] == "bfloat16"
    assert torch.equal(store.batch(slice(None))["contributions"], want.float())
    assert torch.equal(store.component(3), want[:, 3].float())
    assert not torch.equal(want.float(), decompose_fn(imgs).contributions)  # the rounding is real


class Boom(RuntimeError):
    pass


def test_resume_after_interruption_no_duplicates_or_gaps(tmp_path):
    imgs = fake_images(30)
    key = make_key()
    calls = {"n": 0}

    def flaky(images):
        calls["n"] += 1
        if calls["n"] == 4:  # dies while computing the 4th batch
            raise Boom
        return decompose_fn(images)

    with pytest.raises(Boom):  # chunks of 4 rows: each batch of 4 completes one and is committed
        fill_store(open_store(tmp_path, key, chunk_rows=4), batches(imgs, 4), flaky, clip_fn, progress=False)
    assert len(open_store(tmp_path, key)) == 12 and open_store(tmp_path, key).chunk_rows == 4

    # a crash between the flushed data and the commit: rows beyond 'committed' must not count
    store = open_store(tmp_path, key)
    real_commit = store._commit
    store._commit = lambda rows: (_ for _ in ()).throw(Boom())
    with pytest.raises(Boom):
        fill_store(store, batches(imgs, 4), decompose_fn, clip_fn, progress=False)
    store._commit = real_commit
    reopened = open_store(tmp_path, key)
    assert len(reopened) == 12 and len(reopened.ids) == 12
    # the rows of the uncommitted chunk are on disk but do not count; the next append overwrites them
    raw_ids = zarr.open_array(str(reopened.path / "ids"), mode="r")
    assert raw_ids.shape == (16,) and raw_ids[15] == "img0015"

    # resume with a different batch size, through the skip-aware callable form
    seen_starts = []

    def source(start):
        seen_starts.append(start)
        for ids, x in batches(imgs[start:], 7):
            yield [f"img{int(i[3:]) + start:04d}" for i in ids], x

    fill_store(reopened, source, decompose_fn, clip_fn, progress=False)
    final = ContributionStore(reopened.path)
    assert seen_starts == [12]
    assert final.ids == [f"img{i:04d}" for i in range(30)]
    assert zarr.open_array(str(final.path / "ids"), mode="r")[:].tolist() == final.ids
    assert np.array_equal(np.asarray(final.contributions), decompose_fn(imgs).contributions.numpy())
    # running again computes nothing
    calls["n"] = 0
    fill_store(
        final,
        batches(imgs, 4),
        lambda x: (calls.__setitem__("n", calls["n"] + 1), decompose_fn(x))[1],
        clip_fn,
        progress=False,
    )
    assert calls["n"] == 0 and len(ContributionStore(final.path)) == 30


def test_resume_with_changed_source_is_refused(tmp_path):
    imgs = fake_images(8)
    store = fill_store(open_store(tmp_path, make_key()), batches(imgs, 4), decompose_fn, clip_fn, progress=False)
    shuffled = ((["x" + i for i in ids], x) for ids, x in batches(imgs, 4))
    with pytest.raises(MismatchError, match="image source changed"):
        fill_store(store, shuffled, decompose_fn, clip_fn, progress=False)


def test_duplicate_ids_refused(tmp_path):
    store = open_store(tmp_path, make_key())
    dec = decompose_fn(fake_images(2))
    store.append(["a", "b"], dec.contributions, dec.representation, clip_fn(fake_images(2)))
    with pytest.raises(ValueError, match="already"):
        store.append(["b", "c"], dec.contributions, dec.representation, clip_fn(fake_images(2)))
    assert len(store) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"model": "toy@other-weights"},
        {"clip": "clip@laion"},
        {"start_layer": 3},
        {"labels": NAMES[::-1]},
        {"preprocess": "q"},
        {"images": "another-set"},
    ],
)
def test_key_mismatch_never_reused(tmp_path, change):
    imgs = fake_images(6)
    store = fill_store(open_store(tmp_path, make_key()), batches(imgs, 3), decompose_fn, clip_fn, progress=False)
    other = make_key(**change)
    assert store_dir(tmp_path, other) != store.path  # open_store: a fresh folder
    assert len(open_store(tmp_path, other)) == 0
    with pytest.raises(MismatchError, match="different setting"):
        ContributionStore(store.path, key=other)  # opening the old folder under a new key: refused
    assert len(ContributionStore(store.path, key=make_key())) == 6


def test_layout_mismatch_at_write_refused(tmp_path):
    store = open_store(tmp_path, make_key(labels=[*NAMES[:-1], "L0.other"]))
    dec = decompose_fn(fake_images(2))
    with pytest.raises(MismatchError, match="layout"):
        store.append(["a", "b"], dec.contributions, dec.representation, clip_fn(fake_images(2)), labels=dec.names)


def test_rows_read_the_same_from_disk_and_from_memory(tmp_path):
    """The Rows protocol: a store and its rows in memory give the same batches (ascending order),
    columns and lengths, so an aligner trained from either is the same."""
    from vitdecomp.align import train_aligner

    imgs = fake_images(40)
    store = fill_store(open_store(tmp_path, make_key()), batches(imgs, 16), decompose_fn, clip_fn, progress=False)
    memory = store.in_memory()
    dec = decompose_fn(imgs)
    arrays = ArrayRows(dec.contributions, clip_fn(imgs), dec.representation, labels=NAMES)
    for rows in (memory, arrays):
        assert len(rows) == len(store) == 40 and rows.labels == store.labels and rows.shapes == store.shapes
        for name in ("contributions", "representation", "clip"):
            assert torch.equal(rows.batch([9, 3, 30])[name], store.batch([30, 9, 3])[name])
            got = torch.cat([b[name] for b in rows.iter_batches(7)])
            assert torch.equal(got, torch.cat([b[name] for b in store.iter_batches(7)]))
        assert torch.equal(rows.component(2, stop=11), store.component(2, stop=11))
    assert memory.key == store.key and memory.ids == store.ids
    kw = dict(batch_size=8, max_steps=12, eval_every=4, progress=False)
    a, b = train_aligner(store, **kw), train_aligner(memory, **kw)
    assert torch.equal(a.weight, b.weight) and a.metrics == b.metrics and a.key == b.key
