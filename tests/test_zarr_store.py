"""The store as a zarr v3 group: read by plain zarr, at fsspec URLs, written by concurrent workers
chunk by chunk, resumed at chunk granularity, and old memmap folders refused by name."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
import zarr

from vitdecomp.errors import CacheError, MismatchError
from vitdecomp.pipeline.fill import fill_store
from vitdecomp.store import ContributionStore, StoreKey, open_store, store_dir

C, D, K = 4, 6, 3
NAMES = ["init", "L0.H0", "L0.H1", "L0.mlp"]


def key(**over) -> StoreKey:
    return StoreKey(**{**dict(model="toy", clip="clip", labels=NAMES, start_layer=0, preprocess="p"), **over})


def rows(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` rows of random data: ids, contributions [n, C, D], representation [n, D], clip [n, K]."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, C, D, generator=g)
    return [f"im{i:03d}" for i in range(n)], c, c.sum(1), torch.randn(n, K, generator=g)


def test_a_foreign_reader_needs_only_zarr(tmp_path):
    """Every array, the ids and the key open with zarr alone and equal what vitdecomp wrote."""
    ids, c, z, e = rows(10)
    store = open_store(tmp_path, key(), dtype="float16", chunk_rows=4)
    store.append(ids[:7], c[:7], z[:7], e[:7])
    store.append(ids[7:], c[7:], z[7:], e[7:])
    g = zarr.open_group(str(store.path), mode="r")
    assert g.attrs["vitdecomp"]["key"]["labels"] == NAMES and g.attrs["vitdecomp"]["dtype"] == "float16"
    assert np.array_equal(g["contributions"][:], c.half().numpy())
    assert np.array_equal(g["representation"][:], z.numpy()) and np.array_equal(g["clip"][:], e.numpy())
    assert g["ids"][:].tolist() == ids
    assert g["contributions"].shards == (4, C, D) and g["contributions"].chunks == (4, 1, D)
    assert g["contributions"].metadata.dimension_names == ("image", "component", "dim")  # for xarray
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest == {"chunk_rows": 4, "chunks": {"0": 4, "1": 4, "2": 2}}


def test_an_in_memory_url_round_trips(tmp_path):
    """A store at an fsspec URL (memory://) is written, reopened by URL and refuses another key."""
    root = f"memory://vitdecomp-test-{tmp_path.name}"
    ids, c, z, e = rows(9)
    store = open_store(root, key(), chunk_rows=4)
    assert isinstance(store.path, str) and store.path.startswith("memory://")
    store.append(ids, c, z, e)
    again = ContributionStore(store.path)
    assert again.ids == ids and torch.equal(again.batch(slice(None))["contributions"], c)
    assert torch.equal(torch.cat([b["clip"] for b in again.iter_batches(2)]), e)
    assert zarr.open_group(store.path, mode="r")["contributions"].shape == (9, C, D)
    with pytest.raises(MismatchError, match="different setting"):
        ContributionStore(store.path, key=key(model="other"))
    assert store_dir(root, key()) == store.path


def _write_chunks(path: str, chunks: list[int], n: int) -> None:
    """A worker: write whole chunks of rows into the allocated store, commit nothing."""
    store = ContributionStore(path)
    ids, c, z, e = rows(n)
    r = store.chunk_rows
    for k in chunks:
        s = slice(k * r, min(n, (k + 1) * r))
        store.write_rows(s.start, ids[s], c[s], z[s], e[s])


def test_concurrent_writers_fill_disjoint_chunks(tmp_path):
    """Two processes write alternate chunks at once; one driver commits them: the store equals the
    data, each row once, and chunks the driver did not commit do not count."""
    n = 22
    ids, c, _, e = rows(n)
    store = open_store(tmp_path, key(), chunk_rows=4)
    store.allocate(n, D, K)
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
    ids, c, z, e = rows(12)
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

    store = open_store(tmp_path, key(), chunk_rows=4)
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
    folder = store_dir(tmp_path, key())
    folder.mkdir(parents=True)
    (folder / "header.json").write_text(json.dumps({"format_version": 2}))
    (folder / "contributions.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CacheError, match="old memmap format") as err:
        open_store(tmp_path, key())
    assert str(folder) in str(err.value) and "rm -r" in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_manifest_names_the_store(tmp_path):
    ids, c, z, e = rows(5)
    store = open_store(tmp_path, key())
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
    w = torch.linalg.qr(torch.randn(C, e_dim, D, generator=g)).Q
    c = torch.randn(n, C, D, generator=g) + 0.5 * torch.randn(1, C, D, generator=g)
    z = torch.einsum("ncd,ced->ne", c, w)
    store = open_store(tmp_path, key(), chunk_rows=16)
    store.append([f"i{i}" for i in range(n)], c, c.sum(1), z)
    row_bytes = 4 * (C * D + D + e_dim)
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
