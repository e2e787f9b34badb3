"""The contribution store: exact round trip, resume after interruption, key refusal; and the store as
a zarr v3 group: read by plain zarr, at fsspec URLs, written by concurrent workers chunk by chunk,
resumed at chunk granularity, and old memmap folders refused by name."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
import zarr

from vitdecomp.components import ComponentLabel, Decomposition
from vitdecomp.errors import CacheError, MismatchError
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


# ------------------------------------------------------------------ the zarr layout

ZC, ZK = 4, 3  # the zarr layout tests' components and reader width (D as above)
Z_NAMES = ["init", "L0.H0", "L0.H1", "L0.mlp"]


def zarr_key(**over) -> StoreKey:
    return StoreKey(**{**dict(model="toy", clip="clip", labels=Z_NAMES, start_layer=0, preprocess="p"), **over})


def zarr_rows(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` rows of random data: ids, contributions [n, ZC, D], representation [n, D], clip [n, ZK]."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, ZC, D, generator=g)
    return [f"im{i:03d}" for i in range(n)], c, c.sum(1), torch.randn(n, ZK, generator=g)


def test_a_foreign_reader_needs_only_zarr(tmp_path):
    """Every array, the ids and the key open with zarr alone and equal what vitdecomp wrote."""
    ids, c, z, e = zarr_rows(10)
    store = open_store(tmp_path, zarr_key(), dtype="float16", chunk_rows=4)
    store.append(ids[:7], c[:7], z[:7], e[:7])
    store.append(ids[7:], c[7:], z[7:], e[7:])
    g = zarr.open_group(str(store.path), mode="r")
    assert g.attrs["vitdecomp"]["key"]["labels"] == Z_NAMES and g.attrs["vitdecomp"]["dtype"] == "float16"
    assert np.array_equal(g["contributions"][:], c.half().numpy())
    assert np.array_equal(g["representation"][:], z.numpy()) and np.array_equal(g["clip"][:], e.numpy())
    assert g["ids"][:].tolist() == ids
    assert g["contributions"].shards == (4, ZC, D) and g["contributions"].chunks == (4, 1, D)
    assert g["contributions"].metadata.dimension_names == ("image", "component", "dim")  # for xarray
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest == {"chunk_rows": 4, "chunks": {"0": 4, "1": 4, "2": 2}}


def test_an_in_memory_url_round_trips(tmp_path):
    """A store at an fsspec URL (memory://) is written, reopened by URL and refuses another key."""
    root = f"memory://vitdecomp-test-{tmp_path.name}"
    ids, c, z, e = zarr_rows(9)
    store = open_store(root, zarr_key(), chunk_rows=4)
    assert isinstance(store.path, str) and store.path.startswith("memory://")
    store.append(ids, c, z, e)
    again = ContributionStore(store.path)
    assert again.ids == ids and torch.equal(again.batch(slice(None))["contributions"], c)
    assert torch.equal(torch.cat([b["clip"] for b in again.iter_batches(2)]), e)
    assert zarr.open_group(store.path, mode="r")["contributions"].shape == (9, ZC, D)
    with pytest.raises(MismatchError, match="different setting"):
        ContributionStore(store.path, key=zarr_key(model="other"))
    assert store_dir(root, zarr_key()) == store.path


def _write_chunks(path: str, chunks: list[int], n: int) -> None:
    """A worker: write whole chunks of rows into the allocated store, commit nothing."""
    store = ContributionStore(path)
    ids, c, z, e = zarr_rows(n)
    r = store.chunk_rows
    for k in chunks:
        s = slice(k * r, min(n, (k + 1) * r))
        store.write_rows(s.start, ids[s], c[s], z[s], e[s])


def test_concurrent_writers_fill_disjoint_chunks(tmp_path):
    """Two processes write alternate chunks at once; one driver commits them: the store equals the
    data, each row once, and chunks the driver did not commit do not count."""
    n = 22
    ids, c, _, e = zarr_rows(n)
    store = open_store(tmp_path, zarr_key(), chunk_rows=4)
    store.allocate(n, D, ZK)
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_write_chunks, args=(str(store.path), part, n)) for part in ([0, 2, 4], [1, 3, 5])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    store.commit({0: 4, 1: 4, 3: 4})  # chunk 2 written but not committed: the run is not done
    assert len(ContributionStore(store.path)) == 8
    store.commit({2: 4, 4: 4, 5: 2})
    done = ContributionStore(store.path)
    assert done.ids == ids and len(set(done.ids)) == n
    b = done.batch(slice(None))
    assert torch.equal(b["contributions"], c) and torch.equal(b["clip"], e)


def test_resume_rewrites_only_the_uncommitted_chunk(tmp_path):
    """fill_store holds rows until a chunk is complete: a failure loses only the chunk under way, and
    the resumed run recomputes from that chunk's first row."""
    ids, c, z, e = zarr_rows(12)
    seen: list[list[str]] = []

    def batches(start: int):
        for s in range(start, 12, 3):
            yield ids[s : s + 3], list(range(s, min(s + 3, 12)))

    def decompose(images):
        seen.append([ids[i] for i in images])
        if len(seen) == 3:
            raise RuntimeError("worker lost")
        from vitdecomp.components import ComponentLabel, Decomposition

        labels = [ComponentLabel("init"), ComponentLabel("attn_head", 0, 0), ComponentLabel("attn_head", 0, 1)]
        return Decomposition(c[images], [*labels, ComponentLabel("mlp", 0)], z[images])

    def embed(images):
        return e[images]

    store = open_store(tmp_path, zarr_key(), chunk_rows=4)
    with pytest.raises(RuntimeError):
        fill_store(store, batches, decompose, embed, progress=False)
    # batch 1 (im000..2) was held, batch 2 completed chunk 0 and both were committed (chunk 1 in part)
    assert len(ContributionStore(store.path)) == 6
    seen.clear()
    fill_store(ContributionStore(store.path), batches, decompose, embed, progress=False)
    assert seen[0] == ["im006", "im007", "im008"]  # restarts at the first uncommitted row
    done = ContributionStore(store.path)
    assert done.ids == ids and torch.equal(done.batch(slice(None))["contributions"], c)


def test_an_old_memmap_store_is_refused_by_name(tmp_path):
    folder = store_dir(tmp_path, zarr_key())
    folder.mkdir(parents=True)
    (folder / "header.json").write_text(json.dumps({"format_version": 2}))
    (folder / "contributions.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CacheError, match="old memmap format") as err:
        open_store(tmp_path, zarr_key())
    assert str(folder) in str(err.value) and "rm -r" in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_manifest_names_the_store(tmp_path):
    ids, c, z, e = zarr_rows(5)
    store = open_store(tmp_path, zarr_key())
    store.append(ids, c, z, e)
    (store.path / "manifest.json").write_text('{"chunks": ')
    with pytest.raises(CacheError, match="rm -r") as err:
        ContributionStore(store.path)
    assert str(store.path) in str(err.value)


def test_aligner_training_streams_a_large_store_in_bounded_windows(tmp_path, monkeypatch):
    """Rows larger than the window are never read whole: every read holds at most one window of
    chunks, whole chunks are held out, and the planted maps are still recovered."""
    from vitdecomp.align import train_aligner

    n, e_dim = 800, 8
    g = torch.Generator().manual_seed(0)
    w = torch.linalg.qr(torch.randn(ZC, e_dim, D, generator=g)).Q
    c = torch.randn(n, ZC, D, generator=g) + 0.5 * torch.randn(1, ZC, D, generator=g)
    z = torch.einsum("ncd,ced->ne", c, w)
    store = open_store(tmp_path, zarr_key(), chunk_rows=16)
    store.append([f"i{i}" for i in range(n)], c, c.sum(1), z)
    row_bytes = 4 * (ZC * D + D + e_dim)
    window = 4 * 16 * row_bytes  # 4 chunks of 16 rows: 64 of the 800 rows
    reads: list[int] = []
    real_read = ContributionStore._read
    monkeypatch.setattr(
        ContributionStore,
        "_read",
        lambda self, name, index: reads.append(len(real_read(self, name, index))) or real_read(self, name, index),
    )
    kw = dict(lr=1e-2, batch_size=32, max_steps=250, eval_every=50, patience=6, window_bytes=window, progress=False)
    a = train_aligner(store, **kw)
    assert max(reads) <= 64 and a.metrics["n_val"] % 16 == 0  # windows of 4 chunks; held out by chunk
    assert a.metrics["val_cosine"] > 0.98
    exact = train_aligner(store.in_memory(), **{**kw, "window_bytes": 1 << 40})  # everything in one window
    assert exact.metrics["n_val"] == 80 and exact.metrics["val_cosine"] > 0.99


def test_fill_bar_says_which_block_a_batch_is_in_and_leaves_no_hook(tmp_path, monkeypatch):
    """While a batch runs, the fill bar names the block it is in (forward hooks on the model's
    repeated blocks); the rows are those of a fill without it and the hooks are gone afterwards."""
    import vitdecomp.pipeline.fill as fill

    blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(4))
    assert fill.repeated_blocks(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), blocks)) == list(blocks)
    said: list[str] = []

    def through_blocks(images: torch.Tensor) -> Decomposition:
        for b in blocks:
            b(images)
        return decompose_fn(images)

    monkeypatch.setattr("vitdecomp.progress.REDRAW_S", 0.0)
    monkeypatch.setattr(fill.tqdm, "set_postfix_str", lambda self, s, refresh=True: said.append(s))
    imgs = fake_images(9)
    store = fill_store(
        open_store(tmp_path, make_key()), batches(imgs, 5), through_blocks, clip_fn, progress=True, blocks=blocks
    )
    assert said == [f"block {i}/4" for i in (1, 2, 3, 4)] * 2
    assert np.array_equal(np.asarray(store.contributions), decompose_fn(imgs).contributions.numpy())
    assert all(not b._forward_hooks for b in blocks)


def test_return_large_blocks_sets_glibcs_threshold_unless_the_user_did(monkeypatch):
    """analyze fixes glibc's mmap threshold (allocator.py); a MALLOC_MMAP_THRESHOLD_ the user set wins."""
    import sys

    from vitdecomp.allocator import return_large_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_blocks() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert return_large_blocks() is sys.platform.startswith("linux")


def test_reader_beside_the_subject_fills_the_same_rows(tmp_path):
    """The reader's embedding in a second thread (reader_beside) writes the rows of a fill without it;
    an error in the reader's thread reaches the caller; a subject that reads itself never runs beside."""
    import threading

    import vitdecomp.pipeline.fill as fill

    imgs = fake_images(11)
    threads: set[str] = set()

    def clip_in_thread(x):
        threads.add(threading.current_thread().name)
        assert not torch.is_grad_enabled()
        return clip_fn(x)

    def fill_beside(name: str, embed_fn):
        store = open_store(tmp_path / name, make_key())
        return fill_store(store, batches(imgs, 4), decompose_fn, embed_fn, progress=False, reader_beside=True)

    plain = fill_store(open_store(tmp_path / "a", make_key()), batches(imgs, 4), decompose_fn, clip_fn, progress=False)
    beside = fill_beside("b", clip_in_thread)
    assert np.array_equal(np.asarray(beside.contributions), np.asarray(plain.contributions))
    assert np.array_equal(np.asarray(beside.clip), np.asarray(plain.clip))
    assert threads and all(t.startswith("reader") for t in threads)

    def broken(x):
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        fill_beside("c", broken)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert fill._shared(net, net) and fill._shared(torch.nn.Sequential(net), net)
    assert not fill._shared(net, torch.nn.Sequential(torch.nn.Linear(2, 2)))
