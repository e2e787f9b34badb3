"""On-disk, keyed, resumable store of decompositions and CLIP image embeddings for one image set.

A store is a directory holding ``.npy`` arrays (row ``n`` = image ``n``) that ``np.load`` reads
without vitdecomp (``np.load(".../contributions.npy", mmap_mode="r")``: the committed rows)::

    header.json          key (everything that changes the numbers), shapes, dtype, format version
    state.json           {"committed": rows safely on disk, "capacity": rows the files can hold}
    contributions.npy    [committed, C, D]  float32 or float16 (room for ``capacity`` rows after it)
    representation.npy   [committed, D]     float32
    clip.npy             [committed, d_clip] float32
    ids.txt              one image id per committed row (UTF-8)
    lock                 held by the run that writes the store (names it)

Each ``.npy`` file has a fixed-size header (:data:`NPY_HEADER` bytes) whose shape is rewritten in
place after each commit; the file is longer than that shape says (the spare capacity), which
``np.load`` ignores.

Writes go batch by batch: the arrays are written and flushed, the ids appended and synced, and only
then ``state.json`` is atomically replaced with the new ``committed`` count. Rows past ``committed``
are garbage from an interrupted batch and are overwritten on resume, so an interruption never leaves
duplicate or missing rows. :func:`open_store` names the directory after a hash of the key, so a
different model / CLIP / start layer / component layout / preprocessing / image set / dtype never
reuses another setting's numbers; opening a directory whose header holds a different key raises
:class:`~vitdecomp.errors.MismatchError`. The store only writes and reads rows: running the models
that produce them is the pipeline's job (:func:`vitdecomp.pipeline.stages.fill_store`).

Readers (alignment, descriptions, scores) take any :class:`Rows`: a store, its rows read into
memory (:meth:`ContributionStore.in_memory`) or arrays (:class:`ArrayRows`, :func:`as_rows`). The
array called ``clip`` holds the reader's image embedding of each image (the reader is the CLIP
model whose text space names the components); the name is kept from the on-disk format.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch

from vitdecomp.errors import CacheError, LockedError, MismatchError
from vitdecomp.fsio import atomic_write_text, fault_point, writing

FORMAT_VERSION = 2
#: Bytes of each array file's ``.npy`` header (fixed, so that the row count can be rewritten in place).
NPY_HEADER = 128
DTYPES = {"float32": np.float32, "float16": np.float16}
_ARRAYS = ("contributions", "representation", "clip")

#: Rows as float32 tensors: ``"contributions" [b, C, D]``, ``"representation" [b, D]`` and
#: ``"clip" [b, d_clip]`` (the reader's image embedding); arrays a source does not hold are absent.
RowBatch: TypeAlias = dict[str, torch.Tensor]
#: Which rows: a slice or integer positions (rows come back in ascending order).
RowIndex: TypeAlias = slice | np.ndarray | Sequence[int]


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

    Implemented by :class:`ContributionStore` (memmaps on disk) and :class:`ArrayRows` (tensors in
    memory); :func:`as_rows` turns arrays into rows. ``labels``: component names (``None`` for bare
    arrays); ``key``: the store key of the data (``None`` when unknown); ``shapes``: per-row shape
    of each array held (``"contributions"``, and ``"representation"`` / ``"clip"`` when held).
    """

    @property
    def labels(self) -> list[str] | None: ...

    @property
    def key(self) -> StoreKey | None: ...

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def __len__(self) -> int: ...

    def batch(self, index: RowIndex) -> RowBatch:
        """Rows ``index`` (in ascending order) as float32 tensors."""
        ...

    def iter_batches(self, batch_size: int = 256) -> Iterator[RowBatch]:
        """Every row in order, ``batch_size`` at a time."""
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

    Batches are float32 views where the arrays already are float32 (no copy)."""

    def __init__(
        self,
        contributions: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray | None = None,
        representation: torch.Tensor | np.ndarray | None = None,
        *,
        labels: Sequence[str] | None = None,
        key: StoreKey | None = None,
        ids: Sequence[str] | None = None,
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

    def __len__(self) -> int:
        return int(self.arrays["contributions"].shape[0])

    def batch(self, index: RowIndex) -> RowBatch:
        i = _sorted_index(index)
        i = i if isinstance(i, slice) else torch.from_numpy(i)
        return {name: a[i].float() for name, a in self.arrays.items()}

    def iter_batches(self, batch_size: int = 256) -> Iterator[RowBatch]:
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size))

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


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def _read_json(path: Path) -> dict[str, Any]:
    """A store's JSON file, or :class:`CacheError` naming it and how to rebuild the store."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        raise CacheError(
            f"cannot read {path} ({type(err).__name__}: {str(err)[:80]}): the store is damaged; "
            f"delete it (rm -r '{path.parent}') and rerun to recompute it"
        ) from err


class StoreLock:
    """An exclusive lock on a store folder (``lock``: an ``flock`` on that file, released by the
    kernel when the process dies, even by ``kill -9``). The file names the holder (pid, host, command,
    since); a second writer waits up to ``timeout`` seconds, then fails with
    :class:`~vitdecomp.errors.LockedError` naming the holder."""

    def __init__(self, folder: str | Path, timeout: float = 0.0) -> None:
        self.path = Path(folder) / "lock"
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
                    os.close(fd)
                    raise LockedError(
                        f"the store {self.path.parent} is being written by another run ({holder}); wait for it "
                        "to finish, or use another --cache-dir"
                    ) from None
                time.sleep(0.2)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
        holder += " ".join(sys.argv)[:200]
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ContributionStore:
    """A store directory (see the module docstring); open with :func:`open_store` or by path.

    Read access: ``contributions [N, C, D]``, ``representation [N, D]``, ``clip [N, d_clip]`` are
    read-only ``np.memmap`` views of the committed rows; ``ids`` the image ids; ``labels`` the names;
    :meth:`batch`, :meth:`iter_batches` and :meth:`component` read them as :class:`Rows`. Write
    access: :meth:`append` (one batch of rows, committed atomically).
    """

    def __init__(self, path: str | Path, key: StoreKey | None = None, dtype: str = "float32") -> None:
        self.path = Path(path)
        header_path = self.path / "header.json"
        if header_path.exists():
            self.header = _read_json(header_path)
            if self.header.get("format_version") != FORMAT_VERSION:
                raise MismatchError(
                    f"store {self.path} has format version {self.header.get('format_version')}, "
                    f"this vitdecomp writes {FORMAT_VERSION}; delete the folder to recompute"
                )
            if key is not None and self.header["key"] != key.to_dict():
                diff = "; ".join(key_difference(self.header["key"], key.to_dict()))
                raise MismatchError(
                    f"store {self.path} was computed for a different setting ({diff}); "
                    "it will not be reused — use open_store(root, key) for a key-named folder, or delete it"
                )
            if key is not None and self.header["dtype"] != dtype:
                raise MismatchError(f"store {self.path} holds {self.header['dtype']}, asked for {dtype}")
        else:
            if key is None:
                raise FileNotFoundError(f"no contribution store at {self.path} (header.json missing)")
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
            self.path.mkdir(parents=True, exist_ok=True)
            self.header = {
                "format_version": FORMAT_VERSION,
                "key": key.to_dict(),
                "key_digest": key.digest(),
                "dtype": dtype,
                "n_components": len(key.labels),
                "dim": None,
                "clip_dim": None,
            }
            _atomic_write_json(header_path, self.header)
        self.key = StoreKey.from_dict(self.header["key"])
        state_path = self.path / "state.json"
        self.state = {"committed": 0, "capacity": 0}
        if state_path.exists():
            self.state = _read_json(state_path)
        self._ids = self._read_ids()
        self._id_set = set(self._ids)
        self._ro: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- layout
    @property
    def labels(self) -> list[str]:
        return list(self.key.labels)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.header["dtype"]])

    @property
    def committed(self) -> int:
        """Rows safely on disk."""
        return int(self.state["committed"])

    def __len__(self) -> int:
        return self.committed

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the arrays (empty until the first write fixed the dims)."""
        c, d, k = self.header["n_components"], self.header["dim"], self.header["clip_dim"]
        if d is None:
            return {}
        return {"contributions": (c, d), "representation": (d,), "clip": (k,)}

    def _dtype_of(self, name: str) -> np.dtype:
        return self.dtype if name == "contributions" else np.dtype(np.float32)

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.npy"

    def _row_bytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name])) * self._dtype_of(name).itemsize

    def _write_npy_header(self, name: str, rows: int) -> None:
        """Rewrite the ``.npy`` header of ``name`` to say ``rows`` rows (in place, synced)."""
        with open(self._file(name), "r+b") as f:
            f.write(npy_header(self._dtype_of(name), (rows, *self.shapes[name])))
            f.flush()
            os.fsync(f.fileno())

    def _read_ids(self) -> list[str]:
        f = self.path / "ids.txt"
        if not f.exists():
            return []
        lines = f.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        n = self.committed
        if len(lines) < n:
            raise CacheError(
                f"store {self.path} is damaged: {len(lines)} ids for {n} committed rows; delete it "
                f"(rm -r '{self.path}') and rerun to recompute it"
            )
        return lines[:n]  # later lines: a batch whose commit did not happen (cut before the next append)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    # ----------------------------------------------------------------- reading
    def _view(self, name: str) -> np.ndarray:
        shape = self.shapes.get(name)
        if shape is None or self.committed == 0:
            return np.zeros((0, *(shape or ())), dtype=self._dtype_of(name))
        view = self._ro.get(name)
        if view is None or view.shape[0] != self.committed:
            rows = (self.committed, *shape)
            view = np.memmap(self._file(name), dtype=self._dtype_of(name), mode="r", shape=rows, offset=NPY_HEADER)
            self._ro[name] = view
        return view

    @property
    def contributions(self) -> np.ndarray:
        """Committed contributions ``[N, C, D]`` (read-only memmap, storage dtype)."""
        return self._view("contributions")

    @property
    def representation(self) -> np.ndarray:
        """Committed representations ``[N, D]`` (float32 memmap)."""
        return self._view("representation")

    @property
    def clip(self) -> np.ndarray:
        """Committed CLIP image embeddings ``[N, d_clip]`` (float32 memmap)."""
        return self._view("clip")

    def batch(self, index: RowIndex) -> RowBatch:
        """Rows ``index`` as float32 tensors: ``contributions [b, C, D]``, ``representation``, ``clip``
        (integer positions are read in ascending order: sequential on disk)."""
        i = _sorted_index(index)
        return {name: torch.from_numpy(np.array(getattr(self, name)[i], dtype=np.float32)) for name in _ARRAYS}

    def in_memory(self, max_bytes: int | None = None) -> ArrayRows | None:
        """Every committed row as float32 tensors (:class:`ArrayRows` with this store's labels, key
        and ids), or ``None`` when the stored contributions take more than ``max_bytes`` (or nothing
        was written yet)."""
        if not self.shapes or (max_bytes is not None and self.contributions.nbytes > max_bytes):
            return None
        b = self.batch(slice(0, self.committed))
        return ArrayRows(
            b["contributions"], b["clip"], b["representation"], labels=self.labels, key=self.key, ids=self.ids
        )

    def iter_batches(self, batch_size: int = 256) -> Iterator[RowBatch]:
        """Committed rows in order, ``batch_size`` at a time (see :meth:`batch`)."""
        for start in range(0, self.committed, batch_size):
            yield self.batch(slice(start, min(start + batch_size, self.committed)))

    def component(self, index: int, stop: int | None = None) -> torch.Tensor:
        """Component ``index`` of the first ``stop`` committed rows: ``[n, D]`` float32 (one column read)."""
        return torch.from_numpy(np.array(self.contributions[:stop, index], dtype=np.float32))

    # ----------------------------------------------------------------- writing
    def _ensure_capacity(self, rows: int) -> None:
        if rows <= self.state["capacity"]:
            return
        new_cap = max(rows, 2 * self.state["capacity"], 64)
        self._ro.clear()
        for name in self.shapes:
            new = not self._file(name).exists()
            with open(self._file(name), "ab") as f:
                f.truncate(NPY_HEADER + new_cap * self._row_bytes(name))
            if new:
                self._write_npy_header(name, self.committed)
        self.state["capacity"] = new_cap
        _atomic_write_json(self.path / "state.json", self.state)

    def _write_rows(self, name: str, start: int, arr: np.ndarray) -> None:
        """Write rows ``start..`` of array ``name`` with plain file writes (not a memory map, whose
        writes on a full disk kill the process with SIGBUS): a full disk is an ``OSError``."""
        data = np.ascontiguousarray(arr, dtype=self._dtype_of(name)).tobytes()
        with open(self._file(name), "r+b") as f:
            f.seek(NPY_HEADER + start * self._row_bytes(name))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def append(
        self,
        ids: Sequence[str],
        contributions: torch.Tensor | np.ndarray,
        representation: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Write one batch (``[B, C, D]``, ``[B, D]``, ``[B, d_clip]`` + ``B`` ids) and commit it."""
        ids = [str(i) for i in ids]
        if labels is not None and list(labels) != self.labels:
            raise MismatchError(
                f"decomposition layout ({len(labels)} components, e.g. {list(labels)[:3]}) differs from the "
                f"store's key ({len(self.labels)} components, e.g. {self.labels[:3]})"
            )
        arrays = {
            "contributions": _np(contributions),
            "representation": _np(representation),
            "clip": _np(clip),
        }
        b = len(ids)
        if any(a.shape[0] != b for a in arrays.values()):
            shapes = [a.shape for a in arrays.values()]
            raise ValueError(f"batch sizes differ: {len(ids)} ids, array shapes {shapes}")
        for i in ids:
            if "\n" in i or "\r" in i:
                raise ValueError(f"image id {i!r} contains a line break")
        dup = [i for i in ids if i in self._id_set]
        if dup or len(set(ids)) != len(ids):
            raise ValueError(f"image ids already in the store (or repeated in the batch): {dup[:5]}")
        c = self.header["n_components"]
        if arrays["contributions"].ndim != 3 or arrays["contributions"].shape[1] != c:
            raise MismatchError(f"contributions {arrays['contributions'].shape} do not have {c} components")
        if self.header["dim"] is None:
            self.header["dim"] = int(arrays["contributions"].shape[2])
            self.header["clip_dim"] = int(arrays["clip"].shape[1])
            _atomic_write_json(self.path / "header.json", self.header)
        for name, shape in self.shapes.items():
            if arrays[name].shape[1:] != shape:
                raise MismatchError(f"{name} rows have shape {arrays[name].shape[1:]}, store holds {shape}")
        if self.dtype == np.float16:
            big = np.abs(arrays["contributions"]).max(initial=0.0)
            if not np.isfinite(big) or big > np.finfo(np.float16).max:
                raise ValueError(f"contributions up to {big:.3g} do not fit float16; use dtype='float32'")
        if b == 0:
            return
        start = self.committed
        with writing(self.path):
            self._ensure_capacity(start + b)
            for name, arr in arrays.items():
                self._write_rows(name, start, arr)
            self._write_ids(start, ids)
            fault_point("store-before-commit")
            self._commit(start + b)
        self._ids.extend(ids)
        self._id_set.update(ids)

    def _write_ids(self, start: int, ids: list[str]) -> None:
        """Append ``ids`` after the first ``start`` lines of ``ids.txt`` (lines of a batch whose
        commit did not happen are cut first). Ids are UTF-8 with undecodable bytes escaped."""
        f = self.path / "ids.txt"
        if f.exists() and len(f.read_text(encoding="utf-8", errors="surrogateescape").splitlines()) != start:
            self._rewrite_ids(self._ids[:start])
        with open(f, "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write("".join(i + "\n" for i in ids))
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite_ids(self, lines: list[str]) -> None:
        atomic_write_text(self.path / "ids.txt", "".join(s + "\n" for s in lines), errors="surrogateescape")

    def _commit(self, rows: int) -> None:
        """``state.json`` says how many rows are safe (the commit); the ``.npy`` headers follow it
        (a kill between the two leaves them naming a shorter, still complete, prefix)."""
        self.state["committed"] = rows
        _atomic_write_json(self.path / "state.json", self.state)
        for name in self.shapes:
            self._write_npy_header(name, rows)

    def close(self) -> None:
        """Release the memory maps (they are reopened on demand)."""
        self._ro.clear()

    def __repr__(self) -> str:
        s = self.shapes.get("contributions", (self.header["n_components"], "?"))
        return f"ContributionStore({str(self.path)!r}, {self.committed} images x {s}, {self.header['dtype']})"


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` (version 1.0) header of exactly :data:`NPY_HEADER` bytes for C-ordered ``shape``."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    body = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(int(s) for s in shape)!r}, }}"
    size = NPY_HEADER - 10
    if len(body) + 1 > size:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + body.encode("latin1").ljust(size - 1) + b"\n"


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def store_dir(root: str | Path, key: StoreKey, dtype: str = "float32") -> Path:
    """The key-named folder of a store under ``root``: ``<model slug>-<digest of key + dtype>``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.model)[:48].strip("_") or "store"
    digest = hashlib.sha256(f"{key.digest(64)}|{dtype}".encode()).hexdigest()[:16]
    return Path(root) / f"{slug}-{digest}"


def open_store(root: str | Path, key: StoreKey, dtype: str = "float32") -> ContributionStore:
    """Open (or create) the store for ``key`` under ``root``; an existing one is resumed."""
    return ContributionStore(store_dir(root, key, dtype), key=key, dtype=dtype)
