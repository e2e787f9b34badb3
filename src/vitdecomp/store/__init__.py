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
missing rows; disjoint workers (:mod:`vitdecomp.pipeline.ray_fill`) write disjoint chunks and one
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
(:func:`vitdecomp.pipeline.fill.fill_store`).

Writers use the public write protocol :class:`StoreWriter` only (never a backend's files): the
in-process filler appends, the Ray runner allocates, asks :meth:`StoreWriter.missing_chunks`, lets
workers :meth:`StoreWriter.write_rows` into handles they :meth:`StoreWriter.reopen`, and commits. A
backend is one entry of :data:`BACKENDS` (today: ``"zarr"``, :mod:`vitdecomp.store.zarr_store`);
:func:`open_store` opens the store of a key with the chosen one.

Modules: ``rows`` (the :class:`Rows` protocol, :class:`ArrayRows`, :class:`StoreKey`) · ``lock``
(:class:`StoreLock`) · ``zarr_store`` (the zarr backend).

Readers (alignment, descriptions, scores, retrieval) take any :class:`Rows`: a store (streamed chunk
by chunk), its rows read into memory (:meth:`ContributionStore.in_memory`) or arrays
(:class:`ArrayRows`, :func:`as_rows`). The array called ``clip`` holds the reader's image embedding
of each image (the reader is the CLIP model whose text space names the components).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vitdecomp.store.lock import StoreLock, is_url
from vitdecomp.store.rows import (
    ArrayNames,
    ArrayRows,
    RowBatch,
    RowIndex,
    Rows,
    RowSource,
    RowSplit,
    StoreKey,
    StorePath,
    as_rows,
    key_difference,
)
from vitdecomp.store.zarr_store import DTYPES, FORMAT_VERSION, ContributionStore, chunk_rows_for

__all__ = [
    "BACKENDS",
    "DTYPES",
    "FORMAT_VERSION",
    "ArrayNames",
    "ArrayRows",
    "ContributionStore",
    "RowBatch",
    "RowIndex",
    "RowSource",
    "RowSplit",
    "Rows",
    "StoreKey",
    "StoreLock",
    "StorePath",
    "StoreWriter",
    "as_rows",
    "chunk_rows_for",
    "is_url",
    "key_difference",
    "open_store",
    "reopen_store",
    "store_dir",
]


class StoreWriter(Rows, Protocol):
    """The public write protocol of a store (what fillers use; a backend implements it).

    ``path`` where it lives; ``committed`` the rows safely stored (the leading run of committed
    chunks); ``chunk_rows`` the unit of writing, committing and resuming; ``ids`` the committed
    rows' image ids.
    """

    path: StorePath

    @property
    def committed(self) -> int: ...

    @property
    def ids(self) -> list[str]: ...

    def allocate(self, rows: int, dim: int, clip_dim: int, expected_rows: int | None = None) -> None:
        """Make room for ``rows`` rows of ``dim``-dim contributions and ``clip_dim``-dim embeddings."""
        ...

    def append(
        self,
        ids: Sequence[str],
        contributions: torch.Tensor | np.ndarray,
        representation: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Write one batch after the committed rows and commit it."""
        ...

    def write_rows(
        self,
        start: int,
        ids: Sequence[str],
        contributions: torch.Tensor | np.ndarray,
        representation: torch.Tensor | np.ndarray,
        clip: torch.Tensor | np.ndarray,
    ) -> None:
        """Write rows ``start ..`` into allocated space without committing them."""
        ...

    def missing_chunks(self, rows: int) -> list[int]:
        """The chunks of the first ``rows`` rows not committed in full."""
        ...

    def commit(self, chunks: dict[int, int]) -> None:
        """List chunks ``{k: rows}`` as committed, atomically."""
        ...

    def reopen(self) -> StoreWriter:
        """A fresh handle on the same store (for another process)."""
        ...

    def close(self) -> None:
        """Drop open handles (reopened on demand)."""
        ...

    def in_memory(self, max_bytes: int | None = None) -> ArrayRows | None:
        """Every committed row in memory, or ``None`` when they take more than ``max_bytes``."""
        ...

    def read_file(self, name: str) -> bytes | None:
        """A file kept beside the rows (an index), ``None`` when absent."""
        ...

    def replace_file(self, name: str, data: bytes) -> None:
        """Write a file beside the rows, whole and atomically."""
        ...


#: Store backends by name: ``backend(path, key=None, dtype="float32", chunk_rows=None)`` opens (or,
#: given a key, creates) the store at ``path``. Add one here to store rows elsewhere.
BACKENDS: dict[str, Callable[..., StoreWriter]] = {"zarr": ContributionStore}
#: The backend :func:`open_store` and :func:`reopen_store` use unless told otherwise.
DEFAULT_BACKEND = "zarr"


def store_dir(root: StorePath, key: StoreKey, dtype: str = "float32") -> StorePath:
    """The key-named folder of a store under ``root``: ``<model slug>-<digest of key + dtype>`` (a
    URL under a URL root)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.model)[:48].strip("_") or "store"
    digest = hashlib.sha256(f"{key.digest(64)}|{dtype}".encode()).hexdigest()[:16]
    if is_url(root):
        return f"{str(root).rstrip('/')}/{slug}-{digest}"
    return Path(root) / f"{slug}-{digest}"


def open_store(
    root: StorePath,
    key: StoreKey,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    backend: str = DEFAULT_BACKEND,
) -> StoreWriter:
    """Open (or create) the store for ``key`` under ``root`` with ``backend``; an existing one is
    resumed. ``chunk_rows``: rows per chunk of a new store (default: :func:`chunk_rows_for` its rows)."""
    return BACKENDS[backend](store_dir(root, key, dtype), key=key, dtype=dtype, chunk_rows=chunk_rows)


def reopen_store(path: StorePath, backend: str = DEFAULT_BACKEND) -> StoreWriter:
    """The existing store at ``path`` (a folder :func:`open_store` made), to read its rows."""
    return BACKENDS[backend](path)
