"""The FAISS index of aligned component subsets: exact search equals brute force, the approximate
index keeps recall@20 >= 0.95, the size rule, and persistence beside the store keyed by subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitdecomp import index as vindex
from vitdecomp.align import Aligner
from vitdecomp.index import build_index, open_index, plan_index, recall_at_k
from vitdecomp.store import ArrayRows, StoreKey, open_store

C, D, E = 5, 8, 6
NAMES = ["init", "L0.H0", "L0.H1", "L0.mlp", "L1.mlp"]


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, Aligner]:
    g = torch.Generator().manual_seed(seed)
    aligner = Aligner(torch.randn(C, E, D, generator=g), torch.randn(E, generator=g), NAMES)
    return torch.randn(n, C, D, generator=g), aligner


def test_exact_search_equals_brute_force_cosine():
    c, al = data(300)
    rows = ArrayRows(c, labels=NAMES)
    q = torch.randn(3, E)
    for comps in (None, ["L0.H1", "L1.mlp"]):
        idx = build_index(rows, al, comps)
        assert idx.plan.kind == "flat"
        aligned = al.apply(c)
        v = aligned.sum(1) + al.bias if comps is None else aligned[:, [NAMES.index(n) for n in comps]].sum(1)
        brute = F.normalize(v, dim=-1) @ F.normalize(q, dim=-1).T  # [N, 3]
        scores, found = idx.search(q, 10)
        top = brute.topk(10, dim=0).values.T.numpy()  # [3, 10]
        # the rows found are the ten best, in order (near-equal ones may swap with the rounding: compare values)
        np.testing.assert_allclose(np.take_along_axis(brute.T.numpy(), found, 1), top, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores, top, rtol=1e-5, atol=1e-5)
        s = idx.scores(q[0], 4)
        assert torch.isfinite(s).sum() == 4 and set(torch.topk(s, 4).indices.tolist()) == set(found[0][:4].tolist())


def test_the_size_rule():
    assert plan_index(1_000_000, 512).kind == "flat"
    p = plan_index(1_281_167, 512)  # ImageNet-1k
    assert (p.kind, p.nlist, p.m, p.nprobe) == ("ivfpq", 4096, 128, 1024)
    assert plan_index(20_000, 32, exact_max_rows=0).nlist == 512  # capped: 39 training rows per list


def test_approximate_index_recall_at_20_on_clustered_rows():
    """IVF-PQ with re-ranking against exact search on rows drawn around 200 centres."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(200, 32, generator=g)
    x = centres[torch.randint(0, 200, (20_000,), generator=g)] + 0.5 * torch.randn(20_000, 32, generator=g)
    rows = ArrayRows(x[:, None], labels=["all"])
    approx = build_index(rows, None, exact_max_rows=0)
    exact = build_index(rows, None)
    assert approx.plan.kind == "ivfpq" and exact.plan.kind == "flat"
    q = centres[:50] + 0.5 * torch.randn(50, 32, generator=g)
    r = recall_at_k(approx.search(q, 20)[1], exact.search(q, 20)[1], 20)
    assert r >= 0.95, r
    # without the re-ranking step the codes alone lose neighbours: the refine stage is doing work
    approx.plan = vindex.IndexPlan(**{**approx.plan.__dict__, "k_factor": 1})
    assert recall_at_k(approx.search(q, 20)[1], exact.search(q, 20)[1], 20) < r


def test_index_is_persisted_beside_the_store_per_subset(tmp_path, monkeypatch):
    c, al = data(40)
    store = open_store(tmp_path, StoreKey("m", "clip", tuple(NAMES)), chunk_rows=16)
    store.append([f"i{i}" for i in range(40)], c, c.sum(1), torch.zeros(40, E))
    first = open_index(store, al, ["L0.H0"])
    files = sorted(p.name for p in (store.path / "indexes").iterdir())
    assert len(files) == 1 and files[0].endswith(".faiss")
    monkeypatch.setattr(vindex, "build_index", lambda *a, **k: pytest.fail("rebuilt instead of read"))
    again = open_index(store, al, ["L0.H0"])
    q = torch.randn(2, E)
    assert np.array_equal(again.search(q, 5)[1], first.search(q, 5)[1])
    monkeypatch.undo()
    open_index(store, al, ["L0.H1"])  # another subset: another file
    assert len(list((store.path / "indexes").iterdir())) == 2
