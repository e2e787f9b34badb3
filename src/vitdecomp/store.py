"""On-disk (or object-store), keyed, resumable store of decompositions and reader embeddings for one
image set: a zarr v3 group that ``zarr`` (and xarray / dask) read without vitdecomp.

Layout (row ``n`` = image ``n``; ``R`` = rows per chunk, see :func:`chunk_rows_for`)::

    zarr.json          group; attribute "vitdecomp": format_version, key (everything that changes the
                       numbers), key_digest, dtype, n_components
    contributions/     [N, C, D]  float32 / float16 / bfloat16 (as uint16 bits); shards of [R, C, D]
                       (uncompressed) made of inner chunks [R, 1, D] (one component's column)
    representation/    [N, D]     float32, chunks [R, D]
    clip/              [N, d]     float32, chunks [R, d] (the reader's image embedding)
    ids/               [N]        image ids (variable-length UTF-8 strings), chunks [R]
    manifest.json      {"chunk_rows": R, "chunks": {"<k>": rows of chunk k committed}}
    lock               local stores: held by the run that writes (names it)

A chunk ``k`` (rows ``k R .. (k+1) R``) is the unit of writing, committing and resuming: its rows
are written to every array first, and only then is it listed in ``manifest.json`` (atomically
replaced; an object store's single PUT). Rows of chunks the manifest does not list are garbage from
an interrupted write and are overwritten on resume, so an interruption never leaves duplicate or
missing rows; disjoint workers (:mod:`vitdecomp.pipeline.runners`) write disjoint chunks and one
driver commits them. The committed rows are the leading run of listed chunks (``len(store)``); the
arrays' shape may be larger while a run is under way.

bfloat16 has no zarr data type: it is stored as its 16-bit pattern (``uint16``), the array's attribute
``"vitdecomp_dtype": "bfloat16"`` says so, and a foreign reader gets float32 back with
``(a.astype(np.uint32) << 16).view(np.float32)``.

:func:`open_store` names the folder after a hash of the key, so a different model / CLIP / start
layer / component layout / preprocessing / image set / dtype never reuses another setting's numbers;
opening a folder holding a different key raises :class:`~vitdecomp.errors.MismatchError`. A folder
of vitdecomp's older memmap format (``header.json``) is refused with the command that removes it.
Paths are local folders or fsspec URLs (``memory://``, ``s3://``, ...). The store only writes and
reads rows: running the models that produce them is the pipeline's job
(:func:`vitdecomp.pipeline.stages.fill_store`).

Readers (alignment, descriptions, scores, retrieval) take any :class:`Rows`: a store (streamed chunk
by chunk), its rows read into memory (:meth:`ContributionStore.in_memory`) or arrays
(:class:`ArrayRows`, :func:`as_rows`). The array called ``clip`` holds the reader's image embedding
of each image (the reader is the CLIP model whose text space names the components).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch

from vitdecomp.errors import CacheError, LockedError, MismatchError
from vitdecomp.fsio import atomic_write_bytes, fault_point, writing

FORMAT_VERSION = 3
#: Storage type of the contributions -> the zarr data type holding it (bfloat16: its uint16 bits).
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_ARRAYS = ("contributions", "representation", "clip")
#: Target size of one chunk of contributions (rows written, committed and resumed together).
CHUNK_BYTES = 64 << 20
MANIFEST = "manifest.json"
#: The group attribute holding the store's header.
ATTRIBUTE = "vitdecomp"

#: Rows as float32 tensors: ``"contributions" [b, C, D]``, ``"representation" [b, D]`` and
#: ``"clip" [b, d_clip]`` (the reader's image embedding); arrays a source does not hold are absent.
RowBatch: TypeAlias = dict[str, torch.Tensor]
#: Which rows: a slice or integer positions (rows come back in ascending order).
RowIndex: TypeAlias = slice | np.ndarray | Sequence[int]
#: A store's location: a local folder or an fsspec URL (``memory://...``).
StorePath: TypeAlias = str | Path


def chunk_rows_for(row_bytes: int, expected_rows: int | None = None, target: int = CHUNK_BYTES) -> int:
    """Rows per chunk for rows of ``row_bytes`` stored bytes: the largest power of two whose rows
    take at most ``target`` bytes, within 16..4096 (DeiT-B with heads in float16: 256), and at most
    an eighth of ``expected_rows`` (zarr stores the last, partial chunk at full size: its padding
    stays under 1/8 of the rows; and workers get at least 8 chunks to share)."""
    rows = max(1, target // max(row_bytes, 1))
    if expected_rows:
        rows = min(rows, max(1, expected_rows // 8))
    return int(min(4096, max(16, 2 ** int(math.log2(rows)))))


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
    (:func:`vitdecomp.align.train_aligner`) draw their random batches within windows of chunks.
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


class StoreLock:
    """An exclusive lock on a store folder (``lock``: an ``flock`` on that file, released by the
    kernel when the process dies, even by ``kill -9``). The file names the holder (pid, host, command,
    since); a second writer waits up to ``timeout`` seconds, then fails with
    :class:`~vitdecomp.errors.LockedError` naming the holder. A store at a URL has no lock (object
    stores have no ``flock``): one driver per store commits, workers write disjoint chunks."""

    def __init__(self, folder: StorePath, timeout: float = 0.0) -> None:
        self.url = is_url(folder)
        self.path = Path("/") if self.url else Path(folder) / "lock"
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        if self.url:
            return self
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


class _Place:
    """Where a store lives: a local folder (``path`` a :class:`Path`) or an fsspec URL (``path`` the
    URL string). Small files (the manifest) are read and replaced whole, atomically."""

    def __init__(self, path: StorePath) -> None:
        text = str(path)
        self.url = text if is_url(text) else None
        self.path: StorePath = text if self.url else Path(text)
        if self.url:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def file(self, name: str) -> str:
        return f"{str(self.path).rstrip('/')}/{name}"

    def read_text(self, name: str) -> str | None:
        """The file's text, ``None`` when it does not exist."""
        try:
            if self.url:
                return self.fs.cat_file(f"{self.root.rstrip('/')}/{name}").decode("utf-8")
            return (Path(self.path) / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        if self.url:
            return bool(self.fs.exists(f"{self.root.rstrip('/')}/{name}"))
        return (Path(self.path) / name).exists()

    def replace_text(self, name: str, text: str) -> None:
        """Replace a file whole: a local rename (:func:`vitdecomp.fsio.atomic_write_text`) or one PUT."""
        self.replace_bytes(name, text.encode("utf-8"))

    def replace_bytes(self, name: str, data: bytes) -> None:
        if self.url:
            with writing(self.file(name)):
                self.fs.pipe_file(f"{self.root.rstrip('/')}/{name}", data)
        else:
            atomic_write_bytes(Path(self.path) / name, data)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            if self.url:
                return bytes(self.fs.cat_file(f"{self.root.rstrip('/')}/{name}"))
            return (Path(self.path) / name).read_bytes()
        except FileNotFoundError:
            return None


def is_url(path: StorePath) -> bool:
    """A store location given as an fsspec URL (``memory://``, ``s3://``, ``file://``...)."""
    return "://" in str(path)


def _damaged(place: _Place, what: str, err: BaseException) -> CacheError:
    return CacheError(
        f"cannot read {place.file(what)} ({type(err).__name__}: {str(err)[:80]}): the store is damaged; "
        f"delete it (rm -r '{place.path}') and rerun to recompute it"
    )


def _read_json(place: _Place, name: str) -> dict[str, Any] | None:
    """A store's JSON file (``None`` when absent), or :class:`CacheError` naming it and the fix."""
    try:
        text = place.read_text(name)
        if text is None:
            return None
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        raise _damaged(place, name, err) from err


def _to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bits widened: the top half of a float32)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def _to_storage(x: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Values in the store's type (bfloat16: its uint16 bit pattern, rounded to nearest by torch)."""
    if dtype == "bfloat16":
        t = torch.as_tensor(x).detach().to("cpu", torch.bfloat16).contiguous()
        return t.view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(_np(x), dtype=DTYPES[dtype])


class ContributionStore:
    """A zarr store of one image set's rows (see the module docstring); open with :func:`open_store`
    or by path.

    Read access (:class:`Rows`): :meth:`batch`, :meth:`iter_batches` (chunk by chunk) and
    :meth:`component` return float32 tensors of committed rows; ``ids`` the image ids, ``labels``
    the component names; ``contributions`` / ``representation`` / ``clip`` are the raw zarr arrays.
    Write access: :meth:`append` (rows after the committed ones, committed at once), or
    :meth:`allocate` + :meth:`write_rows` from any number of workers + :meth:`commit` by one driver.
    """

    def __init__(
        self, path: StorePath, key: StoreKey | None = None, dtype: str = "float32", chunk_rows: int | None = None
    ) -> None:
        self._place = _Place(path)
        self.path = self._place.path
        if self._place.exists("header.json"):
            raise CacheError(
                f"store {self.path} is in vitdecomp's old memmap format (header.json, format 1-2); this "
                f"vitdecomp writes zarr stores (format {FORMAT_VERSION}): delete it (rm -r '{self.path}') and "
                "rerun to recompute it"
            )
        group = _read_json(self._place, "zarr.json")
        if group is None:
            self.header = self._create(key, dtype)
        else:
            self.header = (group.get("attributes") or {}).get(ATTRIBUTE) or {}
            self._check_header(key, dtype)
        self.key = StoreKey.from_dict(self.header["key"])
        self.manifest = _read_json(self._place, MANIFEST) or {"chunk_rows": chunk_rows, "chunks": {}}
        if not isinstance(self.manifest.get("chunks"), dict):
            raise _damaged(self._place, MANIFEST, ValueError("no 'chunks' object"))
        if self.manifest.get("chunk_rows") is None:
            self.manifest["chunk_rows"] = chunk_rows
        self._zarr: dict[str, Any] = {}
        self._ids: list[str] | None = None
        self._id_set: set[str] | None = None

    def _create(self, key: StoreKey | None, dtype: str) -> dict[str, Any]:
        import zarr

        if key is None:
            raise FileNotFoundError(f"no contribution store at {self.path} (zarr.json missing)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
        header = {
            "format_version": FORMAT_VERSION,
            "key": key.to_dict(),
            "key_digest": key.digest(),
            "dtype": dtype,
            "n_components": len(key.labels),
        }
        with writing(self.path):
            zarr.open_group(str(self.path), mode="a", attributes={ATTRIBUTE: header}, zarr_format=3)
        return header

    def _check_header(self, key: StoreKey | None, dtype: str) -> None:
        if self.header.get("format_version") != FORMAT_VERSION or "key" not in self.header:
            raise MismatchError(
                f"store {self.path} has format version {self.header.get('format_version')}, this vitdecomp "
                f"writes {FORMAT_VERSION}; delete it (rm -r '{self.path}') to recompute"
            )
        if key is not None and self.header["key"] != key.to_dict():
            diff = "; ".join(key_difference(self.header["key"], key.to_dict()))
            raise MismatchError(
                f"store {self.path} was computed for a different setting ({diff}); "
                "it will not be reused — use open_store(root, key) for a key-named folder, or delete it"
            )
        if key is not None and self.header["dtype"] != dtype:
            raise MismatchError(f"store {self.path} holds {self.header['dtype']}, asked for {dtype}")

    # ----------------------------------------------------------------- layout
    @property
    def labels(self) -> list[str]:
        return list(self.key.labels)

    @property
    def dtype(self) -> str:
        """Storage type of the contributions: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
        return str(self.header["dtype"])

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk (fixed when the arrays are made; until then the default for these rows)."""
        return int(self.manifest["chunk_rows"] or 256)

    @property
    def committed(self) -> int:
        """Rows safely stored: the leading run of committed chunks."""
        n, k, chunks = 0, 0, self.manifest["chunks"]
        while str(k) in chunks:
            n += int(chunks[str(k)])
            if chunks[str(k)] < self.chunk_rows:
                break
            k += 1
        return n

    def __len__(self) -> int:
        return self.committed

    def _array(self, name: str) -> Any:
        """The zarr array ``name`` (``None`` before the first write made it)."""
        if name not in self._zarr:
            import zarr

            if not self._place.exists(f"{name}/zarr.json"):
                return None
            try:
                self._zarr[name] = zarr.open_array(str(self._place.file(name)), mode="r+", zarr_format=3)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise _damaged(self._place, f"{name}/zarr.json", err) from err
        return self._zarr[name]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the arrays (empty until the first write made them)."""
        arrays = {name: self._array(name) for name in _ARRAYS}
        if any(a is None for a in arrays.values()):
            return {}
        return {name: tuple(int(s) for s in a.shape[1:]) for name, a in arrays.items()}

    @property
    def contributions(self) -> Any:
        """The raw zarr array ``[rows, C, D]`` in its storage type (bfloat16: uint16 bits); rows past
        ``len(store)`` are not committed. Read float32 rows with :meth:`batch`."""
        return self._array("contributions")

    @property
    def representation(self) -> Any:
        """The raw zarr array ``[rows, D]`` (float32)."""
        return self._array("representation")

    @property
    def clip(self) -> Any:
        """The raw zarr array ``[rows, d_clip]`` (float32): the reader's image embeddings."""
        return self._array("clip")

    @property
    def ids(self) -> list[str]:
        """Image ids of the committed rows."""
        if self._ids is None:
            arr, n = self._array("ids"), self.committed
            self._ids = [] if arr is None or n == 0 else [str(s) for s in arr[:n].tolist()]
            if len(self._ids) != n or any(not s for s in self._ids):
                raise CacheError(
                    f"store {self.path} is damaged: missing ids among {n} committed rows; delete it "
                    f"(rm -r '{self.path}') and rerun to recompute it"
                )
        return list(self._ids)

    # ----------------------------------------------------------------- reading
    def _read(self, name: str, index: RowIndex) -> np.ndarray:
        """Committed rows ``index`` of array ``name`` as float32 (a slice is read as one range;
        positions are read in ascending order, touching only their chunks)."""
        arr, n = self._array(name), self.committed
        shape = self.shapes.get(name, ())
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self._read(name, np.arange(start, stop, step))
            raw = arr[start:stop] if stop > start else np.zeros((0, *shape), arr.dtype)
        else:
            idx = _sorted_index(index)
            if len(idx) and (idx[0] < 0 or idx[-1] >= n):
                raise IndexError(f"rows {idx[0]}..{idx[-1]} outside the {n} committed rows of {self.path}")
            runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []
            if not runs:
                raw = np.zeros((0, *shape), arr.dtype)
            elif len(runs) <= 64:  # a few ranges (windows of chunks): one slice each
                raw = np.concatenate([arr[int(r[0]) : int(r[-1]) + 1] for r in runs])
            else:
                raw = arr.oindex[idx]
        return _to_float32(raw, self.dtype if name == "contributions" else "float32")

    def batch(self, index: RowIndex) -> RowBatch:
        """Rows ``index`` as float32 tensors: ``contributions [b, C, D]``, ``representation``, ``clip``."""
        return {name: torch.from_numpy(self._read(name, index)) for name in _ARRAYS}

    def in_memory(self, max_bytes: int | None = None) -> ArrayRows | None:
        """Every committed row as float32 tensors (:class:`ArrayRows` with this store's labels, key,
        ids and chunk size), or ``None`` when they would take more than ``max_bytes`` (or nothing
        was written yet)."""
        if not self.shapes or (max_bytes is not None and self.float32_bytes() > max_bytes):
            return None
        b = self.batch(slice(0, self.committed))
        return ArrayRows(
            b["contributions"],
            b["clip"],
            b["representation"],
            labels=self.labels,
            key=self.key,
            ids=self.ids,
            chunk_rows=self.chunk_rows,
        )

    def float32_bytes(self) -> int:
        """Bytes of every committed row as float32 tensors (what :meth:`in_memory` would hold)."""
        return self.committed * 4 * sum(math.prod(s) for s in self.shapes.values())

    def iter_batches(self, batch_size: int = 256) -> Iterator[RowBatch]:
        """Committed rows in order, ``batch_size`` at a time; read a whole number of batches at once,
        at least one chunk (so that each chunk is read once, in bounded memory)."""
        n = self.committed
        block = math.ceil(max(self.chunk_rows, batch_size) / batch_size) * batch_size
        for start in range(0, n, block):
            rows = self.batch(slice(start, min(start + block, n)))
            for s in range(0, len(rows["clip"]), batch_size):
                yield {name: a[s : s + batch_size] for name, a in rows.items()}

    def component(self, index: int, stop: int | None = None) -> torch.Tensor:
        """Component ``index`` of the first ``stop`` committed rows ``[n, D]`` float32 (reads one
        inner chunk per chunk)."""
        n = self.committed if stop is None else min(stop, self.committed)
        arr = self._array("contributions")
        raw = arr[:n, index] if n else np.zeros((0, self.shapes["contributions"][1]), arr.dtype)
        return torch.from_numpy(_to_float32(raw, self.dtype))

    # ----------------------------------------------------------------- writing
    def allocate(self, rows: int, dim: int, clip_dim: int, expected_rows: int | None = None) -> None:
        """Make the arrays for at least ``rows`` rows of ``dim``-dim contributions and ``clip_dim``-dim
        reader embeddings (fixing the chunk size for ``expected_rows``, default ``rows``), or grow
        them; refuses other dims."""
        c = int(self.header["n_components"])
        want = {"contributions": (c, dim), "representation": (dim,), "clip": (clip_dim,)}
        have = self.shapes
        if have and have != want:
            raise MismatchError(f"rows of shapes {want} do not fit the store {self.path}, which holds {have}")
        with writing(self.path):
            if not have:
                self._create_arrays(want, rows, expected_rows or rows)
            for name in (*_ARRAYS, "ids"):
                arr = self._array(name)
                if arr.shape[0] < rows:
                    arr.resize((rows, *arr.shape[1:]))

    def _create_arrays(self, shapes: dict[str, tuple[int, ...]], rows: int, expected_rows: int) -> None:
        import zarr

        c, d = shapes["contributions"]
        storage = np.dtype(DTYPES[self.dtype])
        r = self.manifest["chunk_rows"] or chunk_rows_for(c * d * storage.itemsize, expected_rows)
        self.manifest["chunk_rows"] = int(r)
        self._place.replace_text(MANIFEST, json.dumps(self.manifest))
        group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        kw: dict[str, Any] = {"compressors": None, "fill_value": 0, "overwrite": True}
        group.create_array(
            "contributions",
            shape=(rows, c, d),
            chunks=(r, 1, d),
            shards=(r, c, d),
            dtype=storage,
            attributes={"vitdecomp_dtype": self.dtype},
            dimension_names=("image", "component", "dim"),
            **kw,
        )
        for name in ("representation", "clip"):
            (k,) = shapes[name]
            dims = ("image", f"{name}_dim")
            group.create_array(name, shape=(rows, k), chunks=(r, k), dtype=np.float32, dimension_names=dims, **kw)
        group.create_array("ids", shape=(rows,), chunks=(r,), dtype=str, dimension_names=("image",), overwrite=True)
        self._zarr.clear()

    def write_rows(
        self,
        start: int,
        ids: Sequence[str],
        contributions: torch.Tensor | np.ndarray,
        representation: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray,
    ) -> None:
        """Write rows ``start ..`` of every array (``[B, C, D]``, ``[B, D]``, ``[B, d_clip]`` + ``B``
        ids) into allocated space, without committing them (see :meth:`commit`). Workers writing
        whole disjoint chunks never touch the same file."""
        b = len(ids)
        arrays = {"contributions": _to_storage(contributions, self.dtype)}
        arrays |= {"representation": _np(representation), "clip": _np(clip)}
        with writing(self.path):
            for name, a in arrays.items():
                self._array(name)[start : start + b] = a
            self._array("ids")[start : start + b] = np.asarray([str(i) for i in ids], dtype=np.dtypes.StringDType())

    def commit(self, chunks: dict[int, int]) -> None:
        """List chunks ``{k: rows written from the chunk's start}`` as committed (one atomic replace
        of the manifest): called once their rows are written."""
        self.manifest["chunks"].update({str(k): int(n) for k, n in chunks.items()})
        self.manifest["chunks"] = dict(sorted(self.manifest["chunks"].items(), key=lambda kv: int(kv[0])))
        fault_point("store-before-commit")
        self._place.replace_text(MANIFEST, json.dumps(self.manifest))
        self._ids = self._id_set = None

    def append(
        self,
        ids: Sequence[str],
        contributions: torch.Tensor | np.ndarray,
        representation: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Write one batch after the committed rows (``[B, C, D]``, ``[B, D]``, ``[B, d_clip]`` + ``B``
        ids) and commit it."""
        ids = [str(i) for i in ids]
        if labels is not None and list(labels) != self.labels:
            raise MismatchError(
                f"decomposition layout ({len(labels)} components, e.g. {list(labels)[:3]}) differs from the "
                f"store's key ({len(self.labels)} components, e.g. {self.labels[:3]})"
            )
        arrays = {"contributions": _np(contributions), "representation": _np(representation), "clip": _np(clip)}
        self._check_batch(ids, arrays)
        if not ids:
            return
        known_ids, known_set = self._ids or [], self._id_set or set()
        start, (b, d), k = len(known_ids), arrays["representation"].shape, arrays["clip"].shape[1]
        self.allocate(start + b, d, k)
        with writing(self.path):
            self.write_rows(start, ids, contributions, representation, clip)
        self._commit(start + b)
        known_ids.extend(ids)
        known_set.update(ids)
        self._ids, self._id_set = known_ids, known_set

    def _check_batch(self, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
        b = len(ids)
        if any(a.shape[0] != b for a in arrays.values()):
            raise ValueError(f"batch sizes differ: {b} ids, array shapes {[a.shape for a in arrays.values()]}")
        if any(not i for i in ids):
            raise ValueError("an image id is empty")
        if self._id_set is None:
            self._ids = self.ids
            self._id_set = set(self._ids)
        known = self._id_set
        dup = [i for i in ids if i in known]
        if dup or len(set(ids)) != len(ids):
            raise ValueError(f"image ids already in the store (or repeated in the batch): {dup[:5]}")
        c = self.header["n_components"]
        if arrays["contributions"].ndim != 3 or arrays["contributions"].shape[1] != c:
            raise MismatchError(f"contributions {arrays['contributions'].shape} do not have {c} components")
        for name, shape in self.shapes.items():
            if arrays[name].shape[1:] != shape:
                raise MismatchError(f"{name} rows have shape {arrays[name].shape[1:]}, store holds {shape}")
        big = float(np.abs(arrays["contributions"]).max(initial=0.0))
        limit = np.finfo(np.float16).max if self.dtype == "float16" else np.finfo(np.float32).max
        if not np.isfinite(big) or big > limit:
            raise ValueError(f"contributions up to {big:.3g} do not fit {self.dtype}; use dtype='float32'")

    def _commit(self, rows: int) -> None:
        """Commit the rows written after the committed ones up to ``rows``: every chunk they touch."""
        r, start = self.chunk_rows, self.committed
        self.commit({k: min(rows, (k + 1) * r) - k * r for k in range(start // r, math.ceil(rows / r))})

    def read_file(self, name: str) -> bytes | None:
        """A file kept beside the arrays (e.g. ``indexes/...``), ``None`` when absent."""
        return self._place.read_bytes(name)

    def replace_file(self, name: str, data: bytes) -> None:
        """Write a file beside the arrays, whole and atomically (a rename, or an object store's PUT)."""
        self._place.replace_bytes(name, data)

    def close(self) -> None:
        """Drop the open arrays (reopened on demand)."""
        self._zarr.clear()

    def __repr__(self) -> str:
        s = self.shapes.get("contributions", (self.header["n_components"], "?"))
        return f"ContributionStore({str(self.path)!r}, {self.committed} images x {s}, {self.dtype})"


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def store_dir(root: StorePath, key: StoreKey, dtype: str = "float32") -> StorePath:
    """The key-named folder of a store under ``root``: ``<model slug>-<digest of key + dtype>`` (a
    URL under a URL root)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.model)[:48].strip("_") or "store"
    digest = hashlib.sha256(f"{key.digest(64)}|{dtype}".encode()).hexdigest()[:16]
    if is_url(root):
        return f"{str(root).rstrip('/')}/{slug}-{digest}"
    return Path(root) / f"{slug}-{digest}"


def open_store(
    root: StorePath, key: StoreKey, dtype: str = "float32", chunk_rows: int | None = None
) -> ContributionStore:
    """Open (or create) the store for ``key`` under ``root``; an existing one is resumed.
    ``chunk_rows``: rows per chunk of a new store (default: :func:`chunk_rows_for` its rows)."""
    return ContributionStore(store_dir(root, key, dtype), key=key, dtype=dtype, chunk_rows=chunk_rows)
