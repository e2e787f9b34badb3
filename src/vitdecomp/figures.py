"""The one home of figure plumbing: matplotlib with its file-only backend (``Agg``, set once), a
figure or an image as PNG bytes, and PNG bytes as a ``data:`` URI that an HTML page inlines.

Applications draw with :func:`pyplot` and hand PNG bytes on (:class:`vitdecomp.results.Figure`); the
report and the sections inline them with :func:`png_data_uri`, or, for pictures (photographs, maps
over them, a figure of both), as JPEG with :func:`jpeg_data_uri` (a third to a fifth of the PNG's
bytes: the report's page and ``results.json`` stay small). matplotlib is imported on first use.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Any

import numpy as np
from PIL import Image


@functools.cache
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend (no display needed; selected once per process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, **savefig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (``savefig`` options, e.g. ``bbox_inches="tight"``); the
    figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    pyplot().close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(image: Any, size: int | None = None, optimize: bool = True) -> bytes:
    """A PIL image (or uint8 array) as RGB PNG bytes, shrunk to longest side ``size`` when larger."""
    im = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    im = im.convert("RGB")
    if size is not None and max(im.size) > size:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


#: JPEG quality of the report's pictures (thumbnails, maps, picture-like figures).
JPEG_QUALITY = 85


def jpeg_data_uri(image: Any, size: int | None = None, quality: int = JPEG_QUALITY) -> str:
    """A PIL image, uint8 array or PNG bytes as a ``data:image/jpeg;base64,...`` URI (RGB; longest side
    shrunk to ``size`` when larger)."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    im = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    im = im.convert("RGB")
    if size is not None and max(im.size) > size:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: JPEG quality of the report's image thumbnails (96 px pictures that identify an image; a fifth smaller
#: than at :data:`JPEG_QUALITY`, which keeps a 1,000-image base-size report under 3 MB).
THUMBNAIL_QUALITY = 75


def thumbnail_data_uri(image: Any, size: int = 96) -> str:
    """A PIL image (or uint8 array) as a JPEG ``data:`` URI thumbnail (longest side ``size``)."""
    return jpeg_data_uri(image, size, quality=THUMBNAIL_QUALITY)
