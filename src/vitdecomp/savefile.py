"""A decomposition on disk, readable without vitdecomp: ``decomposition.safetensors`` + ``labels.json``.

``decomposition.safetensors`` holds plain arrays (``safetensors.numpy.load_file`` reads them as
numpy arrays; the labels are also in its header metadata under ``"vitdecomp"``)::

    contributions        [N, C, D]   one row per component, in labels.json's "labels" order
    representation       [N, D]      the model's own output; contributions.sum(1) reproduces it
    error                [N]         relative completeness error per image
    tokens.<i>           [N, H, T, D] with tokens: head i's contributions split over source tokens
    tokens.<i>.pixel_boxes [T, 4]    (top, left, bottom, right) of each source token (-1: no place)

``labels.json``: ``format`` ("vitdecomp.decomposition"), ``version``, ``labels`` (component names),
``components`` (each label's fields: kind, layer, head, stage, block, sublayer), ``ids`` (image ids
when known), ``tokens`` (per stack: its head labels, grid size, prefix tokens), ``arrays`` (each
array's axes) and ``meta`` (model, weights id, ... as given). Both files are written atomically:
at once (:func:`save_arrays`) or batch by batch (:class:`RowsFile`, the same file, with at most one
batch in memory).

    import json, numpy as np
    from safetensors.numpy import load_file
    arrays = load_file("out/decomposition.safetensors")
    labels = json.load(open("out/labels.json"))["labels"]
    arrays["contributions"][:, labels.index("L11.mlp")]      # [N, D]
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from vitdecomp.errors import CacheError
from vitdecomp.fsio import atomic_write_bytes, atomic_write_text, temp_beside, writing

FORMAT = "vitdecomp.decomposition"
VERSION = 1
ARRAYS_FILE = "decomposition.safetensors"
LABELS_FILE = "labels.json"


def save_arrays(folder: str | Path, arrays: dict[str, np.ndarray], description: dict[str, Any]) -> Path:
    """Write ``arrays`` and ``description`` (the labels.json document, less format/version) to ``folder``."""
    from safetensors.numpy import save

    folder = Path(folder)
    doc = {"format": FORMAT, "version": VERSION, **description}
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"vitdecomp": text})
    atomic_write_bytes(folder / ARRAYS_FILE, blob)
    atomic_write_text(folder / LABELS_FILE, text, errors="surrogateescape")
    return folder


def load_arrays(folder: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the labels.json document of a folder written by :func:`save_arrays`."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        doc = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8", errors="surrogateescape"))
        arrays = load_file(str(folder / ARRAYS_FILE))
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read a saved decomposition in {folder}: {type(err).__name__}: {err}") from err
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CacheError(f"{folder / LABELS_FILE} is not a {FORMAT} version {VERSION} file")
    return arrays, doc


#: safetensors' names of the numpy dtypes a decomposition holds.
DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


class RowsFile:
    """``decomposition.safetensors`` + ``labels.json`` of ``n_rows`` images written batch by batch:
    the same files as :func:`save_arrays`, with one batch in memory at a time.

    The first :meth:`write` fixes the layout (each array of the description's ``arrays`` has the
    images on its first axis and ``n_rows`` rows; any other array, e.g. ``tokens.<i>.pixel_boxes``, is
    written whole, once), writes the header and sizes a temporary file beside the target; each batch's
    rows go to their offsets; :meth:`close` moves the file into place once every row is written, then
    writes ``labels.json`` (an interruption leaves no partial file under either name).
    """

    def __init__(self, folder: str | Path, n_rows: int) -> None:
        self.folder, self.n_rows, self.rows = Path(folder), n_rows, 0
        self._file: IO[bytes] | None = None
        self._tmp: str | None = None
        self._offsets: dict[str, int] = {}
        self._text = ""

    def write(self, arrays: dict[str, np.ndarray], description: dict[str, Any]) -> None:
        """The next batch: ``arrays`` (those of ``description["arrays"]`` with this batch's rows first)
        and the labels.json document (read on the first batch only)."""
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        if self._file is None:
            self._open(arrays, description)
        assert self._file is not None
        b = len(arrays["contributions"])
        if self.rows + b > self.n_rows:
            raise ValueError(f"more than the {self.n_rows} rows announced")
        with writing(self.folder / ARRAYS_FILE):
            for name, a in arrays.items():
                if name in self._per_row:
                    self._file.seek(self._offsets[name] + self.rows * a[0].nbytes)
                    self._file.write(a.tobytes())
        self.rows += b

    def _open(self, arrays: dict[str, np.ndarray], description: dict[str, Any]) -> None:
        self._per_row = set(description["arrays"])
        self._text = json.dumps({"format": FORMAT, "version": VERSION, **description}, indent=1, ensure_ascii=False)
        header: dict[str, Any] = {"__metadata__": {"vitdecomp": self._text}}
        start = 0
        for name, a in arrays.items():
            shape = [self.n_rows, *a.shape[1:]] if name in self._per_row else list(a.shape)
            size = int(np.prod(shape)) * a.dtype.itemsize
            header[name] = {"dtype": DTYPES[a.dtype], "shape": shape, "data_offsets": [start, start + size]}
            start += size
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # safetensors aligns the data on 8 bytes
        base = 8 + len(head)
        with writing(self.folder / ARRAYS_FILE):
            fd, self._tmp = temp_beside(self.folder / ARRAYS_FILE)
            self._file = os.fdopen(fd, "w+b")
            self._file.write(len(head).to_bytes(8, "little") + head)
            self._file.truncate(base + start)
            for name, a in arrays.items():
                self._offsets[name] = base + header[name]["data_offsets"][0]
                if name not in self._per_row:
                    self._file.seek(self._offsets[name])
                    self._file.write(a.tobytes())

    def close(self) -> Path:
        """Move the complete file into place and write ``labels.json``; returns the folder."""
        if self._file is None or self.rows != self.n_rows:
            raise ValueError(f"{self.rows} of {self.n_rows} rows written")
        path = self.folder / ARRAYS_FILE
        with writing(path):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(str(self._tmp), path)
        self._tmp = None
        atomic_write_text(self.folder / LABELS_FILE, self._text, errors="surrogateescape")
        return self.folder

    def abort(self) -> None:
        """Remove the temporary file (an error or an interruption before :meth:`close`)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
        self._tmp = None

    def __enter__(self) -> RowsFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
