"""ImageNet-segmentation as its users hold it: ``gtsegs_ijcv.mat`` (Guillaumin et al., IJCV 2014; 4,276
images with a binary object mask each), the file Chefer et al., TextSpan and LeGrad evaluate on, read
with h5py in its own HDF5 layout (a MATLAB v7.3 file) into a :class:`~vitdecomp.apps.masks.SegmentSet`.

The layout, as the published loaders index it (Chefer et al.'s ``data/Imagenet.py``, TextSpan's
``utils/imagenet_segmentation.py``):

* ``/value/img`` — ``[N, 1]`` object references; image ``i`` is the ``uint8`` dataset
  ``f[f["/value/img"][i, 0]]`` stored column-major as ``[3, W, H]``: transposed ``(2, 1, 0)`` it is
  the ``[H, W, 3]`` RGB image;
* ``/value/gt`` — ``[N, 1]`` references to ``[1, 1]`` cells of references: the mask is
  ``f[f[f["/value/gt"][i, 0]][0, 0]]``, stored ``[W, H]``, transposed ``(1, 0)``; non-zero = object.
  A cell that holds the mask itself (no inner reference) is read as the mask; an empty one (MATLAB
  writes ``MATLAB_empty``) is skipped and listed;
* ``/value/target`` (when present) — references to the class's WordNet id as MATLAB characters
  (``uint16`` codes), which names each image (``000123-n02085620``).

The file is opened read-only; every problem is one :class:`~vitdecomp.errors.UsageError` line naming
the file and, where it is one image's, the image's index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitdecomp.apps.masks import SegmentSet
from vitdecomp.errors import UsageError
from vitdecomp.imageset import display_name

#: The benchmark a ``gtsegs_ijcv.mat`` run is (the name its published figures are filed under).
BENCHMARK = "imagenet-segmentation"
#: Images in the published file.
N_PUBLISHED = 4276
IMAGES, MASKS, TARGETS = "/value/img", "/value/gt", "/value/target"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as err:  # an optional dependency: only this reader needs it
        raise UsageError("--mat needs h5py: pip install h5py (or 'vitdecomp[bench]')") from err
    return h5py


def read_mat(path: str | Path, n: int | None = None) -> SegmentSet:
    """The first ``n`` (all: ``None``) images of a ``gtsegs_ijcv.mat`` with their masks (see the
    module text); images and masks at their stored size, masks ``[H, W]`` bool."""
    h5py, path = _h5py(), Path(path)
    name = display_name(path)
    if not path.is_file():
        raise UsageError(f"no such file: {name} (give the path of gtsegs_ijcv.mat)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UsageError(f"{name}: not an HDF5 file (MATLAB v7.3, as gtsegs_ijcv.mat is): {err}") from err
    with f:
        missing = [k for k in (IMAGES, MASKS) if k not in f]
        if missing:
            raise UsageError(f"{name}: no {' or '.join(missing)} (not gtsegs_ijcv.mat's layout)")
        total = f[IMAGES].shape[0]
        count = total if n is None else min(n, total)
        out = SegmentSet([], [], [], "", benchmark=BENCHMARK, square=True)
        for i in range(count):
            try:
                _read_item(f, i, out)
            except (KeyError, ValueError, TypeError, OSError) as err:
                raise UsageError(f"{name}: image {i} cannot be read in gtsegs_ijcv.mat's layout: {err}") from err
    if not out.names:
        raise UsageError(f"{name}: none of its {count} image(s) has a mask")
    out.description = _description(name, count, total, len(out.skipped))
    return out


def _description(name: str, count: int, total: int, skipped: int) -> str:
    read = f"the first {count} of its {total:,} images" if count < total else f"its {total:,} images"
    gaps = f", {skipped} without a mask skipped" if skipped else ""
    return f"ImageNet-segmentation, {name}: {read}{gaps}"


def _read_item(f: Any, i: int, out: SegmentSet) -> None:
    """Append image ``i`` and its mask to ``out`` (or its name to ``out.skipped`` when it has none)."""
    image = np.asarray(f[f[IMAGES][i, 0]]).transpose(2, 1, 0)
    label = f"{i:06d}" + (f"-{_wnid(f, i)}" if TARGETS in f else "")
    mask = _mask(f, f[MASKS][i, 0])
    if mask is None:
        out.skipped.append(label)
        return
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} for an image of {image.shape[1]}x{image.shape[0]}")
    out.names.append(label)
    out.images.append(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB"))
    out.masks.append(mask)


def _mask(f: Any, ref: Any) -> np.ndarray | None:
    """The ``[H, W]`` bool mask a ``/value/gt`` entry refers to; ``None`` for an empty cell."""
    cell = f[ref]
    if cell.attrs.get("MATLAB_empty", 0):
        return None
    if cell.dtype.kind == "O":  # a cell of references: the mask is its one element
        cell = f[cell[0, 0]]
        if cell.attrs.get("MATLAB_empty", 0):
            return None
    return np.asarray(cell).transpose(1, 0) != 0


def _wnid(f: Any, i: int) -> str:
    """The WordNet id of image ``i``'s class (MATLAB characters)."""
    codes = np.asarray(f[f[TARGETS][i, 0]]).ravel()
    return "".join(chr(int(c)) for c in codes)
