"""Rows of a decomposed image set, read the same way wherever they are held: the :class:`Rows`
protocol, :class:`ArrayRows` (tensors in memory), :func:`as_rows`, and the :class:`StoreKey` that
names everything that changes the stored numbers."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch

from vitdecomp.errors import MismatchError

#: Rows as float32 tensors: ``"contributions" [b, C, D]``, ``"representation" [b, D]`` and
#: ``"clip" [b, d_clip]`` (the reader's image embedding); arrays a source does not hold are absent.
RowBatch: TypeAlias = dict[str, torch.Tensor]

#: Which rows: a slice or integer positions (rows come back in ascending order).
RowIndex: TypeAlias = slice | np.ndarray | Sequence[int]

#: Which arrays a read returns (``None``: every array the rows hold), e.g. ``("representation",)``.
ArrayNames: TypeAlias = Sequence[str] | None

#: A store's location: a local folder or an fsspec URL (``memory://...``).
StorePath: TypeAlias = str | Path


@dataclass(frozen=True)
class StoreKey:
    """Everything that changes a store's numbers.

    ``model`` / ``clip`` are weights ids (``LoadedModel.weights_id``), ``start_layer`` the cut layer
    of the decomposition, ``labels`` the component names in order (the layout), ``preprocess`` a
    description of the preprocessing (e.g. ``repr`` of the transforms), ``images`` an identifier of
    the image set (folder + listing digest, generator seed, ...), ``extra`` any other setting.
    """

    model: str
    clip: str
    labels: tuple[str, ...]
    start_layer: int | None = None
    preprocess: str = ""
    images: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreKey:
        return cls(**{**d, "labels": tuple(d["labels"])})

    def digest(self, length: int = 16) -> str:
        """A short sha256 of the canonical JSON of the key."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:length]


def key_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable list of the fields in which two key dicts differ."""
    out = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name), b.get(name)
        if va != vb:
            if name == "labels" and isinstance(va, list) and isinstance(vb, list):
                out.append(f"labels: {len(va)} components {va[:3]}... vs {len(vb)} components {vb[:3]}...")
            else:
                out.append(f"{name}: {str(va)[:80]!r} vs {str(vb)[:80]!r}")
    return out


class Rows(Protocol):
    """Rows of a decomposed image set, read the same way wherever they are held.

    Implemented by :class:`ContributionStore` (chunks of a zarr store) and :class:`ArrayRows`
    (tensors in memory); :func:`as_rows` turns arrays into rows. ``labels``: component names
    (``None`` for bare arrays); ``key``: the store key of the data (``None`` when unknown);
    ``shapes``: per-row shape of each array held (``"contributions"``, and ``"representation"`` /
    ``"clip"`` when held); ``chunk_rows``: how many consecutive rows are read together at the cost
    of one (a store's chunk; every row for arrays in memory): streaming readers
    (:func:`vitdecomp.align.train_aligner`, :class:`RowSplit`) draw their random batches within
    windows of chunks. ``arrays`` names the arrays a read returns (default: all), so that a reader of
    the representation alone does not read the contributions.
    """

    @property
    def labels(self) -> list[str] | None: ...

    @property
    def key(self) -> StoreKey | None: ...

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    @property
    def chunk_rows(self) -> int: ...

    def __len__(self) -> int: ...

    def batch(self, index: RowIndex, arrays: ArrayNames = None) -> RowBatch:
        """Rows ``index`` (in ascending order) of ``arrays`` (default: all) as float32 tensors."""
        ...

    def iter_batches(self, batch_size: int = 256, arrays: ArrayNames = None) -> Iterator[RowBatch]:
        """Every row in order, ``batch_size`` at a time (``arrays``: as :meth:`batch`)."""
        ...

    def component(self, index: int, stop: int | None = None) -> torch.Tensor:
        """Component ``index`` of the first ``stop`` rows (all by default): ``[n, D]`` float32."""
        ...


def _sorted_index(index: RowIndex) -> slice | np.ndarray:
    return index if isinstance(index, slice) else np.sort(np.asarray(index, dtype=np.int64))


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


class ArrayRows:
    """:class:`Rows` held in memory: ``contributions [N, C, D]`` and, when known, ``clip [N, d_clip]``
    (the reader's image embeddings) and ``representation [N, D]``; tensors or numpy arrays.

    Batches are float32 views where the arrays already are float32 (no copy). ``chunk_rows``: the
    chunk size of the store the rows came from (default: all rows, one chunk)."""

    def __init__(
        self,
        contributions: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray | None = None,
        representation: torch.Tensor | np.ndarray | None = None,
        *,
        labels: Sequence[str] | None = None,
        key: StoreKey | None = None,
        ids: Sequence[str] | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        arrays = {"contributions": contributions, "representation": representation, "clip": clip}
        self.arrays = {name: _tensor(a) for name, a in arrays.items() if a is not None}
        n = {name: int(a.shape[0]) for name, a in self.arrays.items()}
        if len(set(n.values())) > 1:
            raise ValueError(f"arrays differ in their number of rows: {n}")
        if self.arrays["contributions"].ndim != 3:
            raise ValueError(f"contributions must be [N, C, D], not {tuple(self.arrays['contributions'].shape)}")
        if labels is not None and len(labels) != self.arrays["contributions"].shape[1]:
            raise MismatchError(f"{len(labels)} labels for {self.arrays['contributions'].shape[1]} components")
        self._labels = None if labels is None else list(labels)
        self._key = key
        self.ids = None if ids is None else list(ids)
        self._chunk_rows = chunk_rows

    @property
    def labels(self) -> list[str] | None:
        return self._labels

    @property
    def key(self) -> StoreKey | None:
        return self._key

    @property
    def contributions(self) -> torch.Tensor:
        return self.arrays["contributions"]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(a.shape[1:]) for name, a in self.arrays.items()}

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows or max(len(self), 1)

    def __len__(self) -> int:
        return int(self.arrays["contributions"].shape[0])

    def batch(self, index: RowIndex, arrays: ArrayNames = None) -> RowBatch:
        i = _sorted_index(index)
        i = i if isinstance(i, slice) else torch.from_numpy(i)
        return {name: a[i].float() for name, a in self.arrays.items() if arrays is None or name in arrays}

    def iter_batches(self, batch_size: int = 256, arrays: ArrayNames = None) -> Iterator[RowBatch]:
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), arrays)

    def component(self, index: int, stop: int | None = None) -> torch.Tensor:
        return self.arrays["contributions"][:stop, index].float()

    def __repr__(self) -> str:
        return f"ArrayRows({len(self)} images x {self.shapes['contributions']})"


#: What the readers (align, text, score) accept: :class:`Rows`, or arrays that :func:`as_rows` wraps.
RowSource: TypeAlias = Rows | torch.Tensor | np.ndarray | tuple[Any, ...]


def as_rows(source: RowSource) -> Rows:
    """The one place where arrays become :class:`Rows`: a contributions array ``[N, C, D]`` or a
    tuple ``(contributions, clip)`` becomes :class:`ArrayRows`; anything else is taken as rows."""
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return ArrayRows(source)
    if isinstance(source, tuple):
        return ArrayRows(*source)
    return source


@dataclass
class RowSplit:
    """Held-out and training rows of a :class:`Rows`, and the seeded generator that shuffles the
    training rows (what the streaming trainers share: CompAlign, the sparse autoencoders).

    Rows that fit ``window_bytes`` (as float32) are split row by row and shuffled as a whole each
    epoch (``window`` is ``None``). Larger rows are split by chunk (``chunk_rows`` consecutive rows,
    the store's unit of reading): whole chunks are held out, and each epoch visits the training
    chunks in a random order, ``window`` chunks at a time, read once and shuffled row by row.
    ``arrays``: the arrays read (default: all), which also sets the bytes of a row.
    """

    val: np.ndarray
    train: np.ndarray
    gen: np.random.Generator
    chunk_rows: int = 1
    window: int | None = None
    arrays: tuple[str, ...] | None = None

    @classmethod
    def of(
        cls, rows: Rows, val_fraction: float, seed: int = 0, window_bytes: int = 256 << 20, arrays: ArrayNames = None
    ) -> RowSplit:
        """A seeded split holding out ``val_fraction`` of the rows (at least one, never all)."""
        n, gen = len(rows), np.random.default_rng(seed)
        names = None if arrays is None else tuple(arrays)
        row_bytes = 4 * sum(math.prod(s) for a, s in rows.shapes.items() if names is None or a in names)
        if n * row_bytes <= window_bytes or n <= rows.chunk_rows:
            perm = gen.permutation(n)
            n_val = min(max(1, round(val_fraction * n)), n - 1)
            return cls(np.sort(perm[:n_val]), perm[n_val:], gen, arrays=names)
        r = rows.chunk_rows
        chunks = gen.permutation(math.ceil(n / r))
        n_val = min(max(1, round(val_fraction * len(chunks))), len(chunks) - 1)
        val, train = (
            np.sort(np.concatenate([np.arange(k * r, min(n, (k + 1) * r)) for k in part]))
            for part in (chunks[:n_val], chunks[n_val:])
        )
        return cls(val, train, gen, r, max(1, window_bytes // (r * row_bytes)), names)

    def epoch(self, rows: Rows, batch_size: int) -> Iterator[RowBatch]:
        """One pass over the training rows in a fresh shuffled order, ``batch_size`` rows at a time."""
        if self.window is None:
            order = self.gen.permutation(self.train)
            for s in range(0, len(order), batch_size):
                yield rows.batch(order[s : s + batch_size], self.arrays)
            return
        chunks = self.gen.permutation(np.unique(self.train // self.chunk_rows))
        for w in range(0, len(chunks), self.window):
            held = np.isin(self.train // self.chunk_rows, chunks[w : w + self.window])
            data = rows.batch(self.train[held], self.arrays)  # the window, read once (ascending rows)
            order = torch.from_numpy(self.gen.permutation(int(held.sum())))
            for s in range(0, len(order), batch_size):
                yield {name: a[order[s : s + batch_size]] for name, a in data.items()}
            del data  # one window held at a time: this one is let go before the next is read

    def minibatches(self, rows: Rows, batch_size: int) -> Iterator[RowBatch]:
        """Training batches, epoch after epoch, forever."""
        while True:
            yield from self.epoch(rows, batch_size)
