"""The zarr backend of the contribution store (see :mod:`vitdecomp.store` for the layout and the
write protocol): :class:`ContributionStore`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdecomp.errors import CacheError, MismatchError
from vitdecomp.fsio import atomic_write_bytes, fault_point, writing
from vitdecomp.store.lock import is_url
from vitdecomp.store.rows import (
    ArrayNames,
    ArrayRows,
    RowBatch,
    RowIndex,
    StoreKey,
    StorePath,
    _sorted_index,
    key_difference,
)

FORMAT_VERSION = 3

#: Storage type of the contributions -> the zarr data type holding it (bfloat16: its uint16 bits).
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

_ARRAYS = ("contributions", "representation", "clip")

#: Target size of one chunk of contributions (rows written, committed and resumed together).
CHUNK_BYTES = 64 << 20

MANIFEST = "manifest.json"

#: The group attribute holding the store's header.
ATTRIBUTE = "vitdecomp"


def chunk_rows_for(row_bytes: int, expected_rows: int | None = None, target: int = CHUNK_BYTES) -> int:
    """Rows per chunk for rows of ``row_bytes`` stored bytes: the largest power of two whose rows
    take at most ``target`` bytes, within 16..4096 (DeiT-B with heads in float16: 256), and at most
    an eighth of ``expected_rows`` (zarr stores the last, partial chunk at full size: its padding
    stays under 1/8 of the rows; and workers get at least 8 chunks to share)."""
    rows = max(1, target // max(row_bytes, 1))
    if expected_rows:
        rows = min(rows, max(1, expected_rows // 8))
    return int(min(4096, max(16, 2 ** int(math.log2(rows)))))


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
    Write access (:class:`vitdecomp.store.StoreWriter`): :meth:`append` (rows after the committed
    ones, committed at once), or :meth:`allocate` + :meth:`write_rows` from any number of workers
    (:meth:`reopen` in each) + :meth:`commit` by one driver, which asks :meth:`missing_chunks`.
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
            elif len(runs) <= 64:  # a few ranges (windows of chunks): one slice each, into one array
                raw = np.empty((len(idx), *arr.shape[1:]), arr.dtype)
                done = 0
                for r in runs:  # one range's read at a time besides the result (not all, then a copy)
                    raw[done : done + len(r)] = arr[int(r[0]) : int(r[-1]) + 1]
                    done += len(r)
            else:
                raw = arr.oindex[idx]
        return _to_float32(raw, self.dtype if name == "contributions" else "float32")

    def batch(self, index: RowIndex, arrays: ArrayNames = None) -> RowBatch:
        """Rows ``index`` as float32 tensors: ``contributions [b, C, D]``, ``representation``, ``clip``
        (only ``arrays`` when given)."""
        return {name: torch.from_numpy(self._read(name, index)) for name in _ARRAYS if arrays is None or name in arrays}

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

    def iter_batches(self, batch_size: int = 256, arrays: ArrayNames = None) -> Iterator[RowBatch]:
        """Committed rows in order, ``batch_size`` at a time; read a whole number of batches at once,
        at least one chunk (so that each chunk is read once, in bounded memory). ``arrays``: as
        :meth:`batch`."""
        n = self.committed
        block = math.ceil(max(self.chunk_rows, batch_size) / batch_size) * batch_size
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = self.batch(slice(start, stop), arrays)
            for s in range(0, stop - start, batch_size):
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

    def missing_chunks(self, rows: int) -> list[int]:
        """The chunks of the first ``rows`` rows that are not committed in full (what a filler still
        has to write)."""
        r, done = self.chunk_rows, self.manifest["chunks"]
        return [k for k in range(math.ceil(rows / r)) if done.get(str(k)) != min(r, rows - k * r)]

    def reopen(self) -> ContributionStore:
        """A fresh handle on this store (for another process: a worker writing its chunks)."""
        return type(self)(self.path)

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
