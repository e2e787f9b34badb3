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
array's axes) and ``meta`` (model, weights id, ... as given). Both files are written atomically.

    import json, numpy as np
    from safetensors.numpy import load_file
    arrays = load_file("out/decomposition.safetensors")
    labels = json.load(open("out/labels.json"))["labels"]
    arrays["contributions"][:, labels.index("L11.mlp")]      # [N, D]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vitdecomp.errors import CacheError
from vitdecomp.fsio import atomic_write_bytes, atomic_write_text

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
