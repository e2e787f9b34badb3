"""Nearest-neighbour search over a store's aligned component subsets, with FAISS.

Retrieval ranks images by the cosine between a query (a text embedding) and the aligned sum of a
subset of components ``sum_{i in S} W_i c_i`` (all components plus the bias when ``S`` is ``None``:
the aligned whole). The index holds those sums, L2-normalised, so that inner product = cosine.

The rule that picks the index (:func:`plan_index`), by the number of rows ``n``:

* ``n <= EXACT_MAX_ROWS`` (1e6): exact inner product (``IndexFlatIP``): at most ``n * d * 4`` bytes
  (1e6 x 512 dims: 2 GB) and a full scan per query (tens of ms at 1e6);
* beyond: IVF-PQ, ``nlist`` = the power of two nearest ``4 sqrt(n)`` (at most ``n / 39``: enough
  training points per list), codes of ``d / 4`` bytes (8-bit sub-quantisers of 4 dims, no
  polysemous training), ``nprobe = nlist / 4`` lists scanned per query, and the best ``8 k``
  candidates re-ranked on float16 copies of the vectors (``Refine(SQfp16)``); recall@20 against
  exact search is in docs/benchmarks.md. Trained on at most ``64 nlist`` rows drawn by chunk.

An index is built by one streaming pass over the store (never every row in memory at once, beyond
the index itself) and persisted beside the store, under ``indexes/<digest>.faiss`` (atomically),
keyed by the store's key and rows, the component subset, the aligner's weights and the plan.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vitdecomp.align import Aligner
from vitdecomp.store import Rows, StoreWriter, reopen_store

#: Up to this many rows the index is exact (a flat inner-product scan).
EXACT_MAX_ROWS = 1_000_000


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index: ``"flat"`` (exact) or ``"ivfpq"`` with ``nlist`` lists, ``m`` code bytes,
    ``nprobe`` lists scanned per query and re-ranking of ``k_factor * k`` candidates."""

    kind: str
    dim: int
    nlist: int = 0
    m: int = 0
    nprobe: int = 0
    k_factor: int = 8

    def factory(self) -> str:
        """The ``faiss.index_factory`` string of this plan."""
        if self.kind == "flat":
            return "Flat"
        return f"IVF{self.nlist},PQ{self.m}x8np,Refine(SQfp16)"


def plan_index(n: int, dim: int, exact_max_rows: int = EXACT_MAX_ROWS) -> IndexPlan:
    """The index for ``n`` rows of ``dim`` dims (see the module docstring for the rule)."""
    if n <= exact_max_rows:
        return IndexPlan("flat", dim)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, 2 ** int(math.log2(max(n // 39, 1)))))
    m = max(d for d in range(1, max(dim // 4, 1) + 1) if dim % d == 0)
    return IndexPlan("ivfpq", dim, nlist, m, max(1, nlist // 4))


def subset_vectors(
    rows: Rows, aligner: Aligner | None, components: Sequence[int] | None, batch_size: int = 256
) -> Iterator[np.ndarray]:
    """Per batch of rows, the L2-normalised aligned sum of ``components`` (all + the bias when
    ``None``): ``[b, d_clip]`` float32; ``aligner`` ``None`` is the identity."""
    for b in rows.iter_batches(batch_size):
        yield _vectors(b["contributions"], aligner, components)


def _vectors(c: torch.Tensor, aligner: Aligner | None, components: Sequence[int] | None) -> np.ndarray:
    """``[b, C, D]`` contributions -> ``[b, d_clip]`` normalised aligned subset sums."""
    if components is not None:
        c = c[:, list(components)]
    v = (c if aligner is None else _apply(aligner, c, components)).sum(1)
    if components is None and aligner is not None:
        v = v + aligner.bias.to(v.device, torch.float32)
    return torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy()


def _training_sample(rows: Rows, aligner: Aligner | None, cols: Sequence[int] | None, n: int) -> np.ndarray:
    """Vectors of about ``n`` rows from chunks drawn at random (seeded): a store sorted by class
    still trains the coarse quantiser on every class."""
    r, total = rows.chunk_rows, len(rows)
    out, got = [], 0
    for k in np.random.default_rng(0).permutation(math.ceil(total / r)):
        out.append(_vectors(rows.batch(slice(k * r, min(total, (k + 1) * r)))["contributions"], aligner, cols))
        got += len(out[-1])
        if got >= n:
            break
    return np.concatenate(out)


def _apply(aligner: Aligner, c: torch.Tensor, components: Sequence[int] | None) -> torch.Tensor:
    """Map the chosen components' contributions ``[b, k, D] -> [b, k, d_clip]``."""
    x = c.to(aligner.device, torch.float32)
    if aligner.weight is None:
        return x
    if aligner.mode == "shared":
        return torch.einsum("bcd,ed->bce", x, aligner.weight[0])
    w = aligner.weight if components is None else aligner.weight[list(components)]
    return torch.einsum("bcd,ced->bce", x, w)


@dataclass
class ComponentIndex:
    """A FAISS index of ``n`` rows' normalised aligned subset sums (``components``: names, or
    ``None`` for the whole) built by ``plan``."""

    index: object
    plan: IndexPlan
    components: list[str] | None
    n: int

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows of each query ``[q, d]`` by cosine: ``(scores [q, k], rows [q, k])``
        (row -1 where fewer than ``k`` rows exist)."""
        q = np.ascontiguousarray(np.asarray(torch.as_tensor(queries).float().reshape(-1, self.plan.dim)))
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        if self.plan.kind == "flat":
            return self.index.search(q, min(k, self.n))  # type: ignore[attr-defined]
        import faiss

        params = faiss.IndexRefineSearchParameters(k_factor=self.plan.k_factor)
        params.base_index_params = faiss.SearchParametersIVF(nprobe=self.plan.nprobe)
        return self.index.search(q, min(k, self.n), params=params)  # type: ignore[attr-defined]

    def scores(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """``[n]`` scores for one query: the cosine of its ``k`` best rows, ``-inf`` elsewhere (a
        drop-in for a brute-force score vector whose top ``k`` is ranked)."""
        s, i = self.search(query[None], k)
        out = torch.full((self.n,), float("-inf"))
        keep = i[0] >= 0
        out[torch.from_numpy(i[0][keep])] = torch.from_numpy(s[0][keep]).float()
        return out


def build_index(
    rows: Rows,
    aligner: Aligner | None,
    components: Sequence[str] | None = None,
    *,
    plan: IndexPlan | None = None,
    exact_max_rows: int = EXACT_MAX_ROWS,
) -> ComponentIndex:
    """Index the aligned sums of ``components`` (names; ``None``: the whole) of every row, by
    ``plan`` (default :func:`plan_index`); one streaming pass (plus one over the training sample)."""
    import faiss

    labels = rows.labels or []
    cols = None if components is None else [labels.index(c) for c in components]
    dim = rows.shapes["contributions"][1] if aligner is None else aligner.out_dim
    plan = plan or plan_index(len(rows), dim, exact_max_rows)
    index = faiss.index_factory(dim, plan.factory(), faiss.METRIC_INNER_PRODUCT)
    if plan.kind != "flat":
        index.train(_training_sample(rows, aligner, cols, 64 * plan.nlist))
    for v in subset_vectors(rows, aligner, cols):
        index.add(v)
    return ComponentIndex(index, plan, None if components is None else list(components), len(rows))


def index_name(store: StoreWriter, aligner: Aligner | None, components: Sequence[str] | None, plan: IndexPlan) -> str:
    """The file, beside the store, of the index of this store's rows, aligner, subset and plan."""
    h = hashlib.sha256()
    meta = {"key": store.key.digest(64), "rows": len(store), "components": components, "plan": asdict(plan)}
    h.update(json.dumps(meta, sort_keys=True).encode())
    if aligner is not None:
        for t in (aligner.weight, aligner.bias):
            if t is not None:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return f"indexes/{h.hexdigest()[:24]}.faiss"


def open_index(
    store: StoreWriter,
    aligner: Aligner | None,
    components: Sequence[str] | None = None,
    *,
    exact_max_rows: int = EXACT_MAX_ROWS,
) -> ComponentIndex:
    """The persisted index of ``store`` for ``aligner`` and ``components`` (see :func:`build_index`),
    read from beside the store, or built and written there (atomically) first."""
    import faiss

    dim = store.shapes["contributions"][1] if aligner is None else aligner.out_dim
    plan = plan_index(len(store), dim, exact_max_rows)
    name = index_name(store, aligner, components, plan)
    data = store.read_file(name)
    if data is not None:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        return ComponentIndex(index, plan, None if components is None else list(components), len(store))
    built = build_index(store, aligner, components, plan=plan)
    store.replace_file(name, faiss.serialize_index(built.index).tobytes())
    return built


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 20) -> float:
    """Mean share of each query's exact top ``k`` rows that the approximate top ``k`` also holds."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


def store_text_search(
    store_path: str | Path, aligner: Aligner | None, components: Sequence[str] | None, query: torch.Tensor, k: int
) -> torch.Tensor:
    """``[N]`` cosine of the ``k`` rows of the store at ``store_path`` nearest to ``query [d_clip]``
    through ``components`` (``-inf`` elsewhere), from its persisted index (built on first use)."""
    return open_index(reopen_store(store_path), aligner, components).scores(query, k)
