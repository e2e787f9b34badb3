"""The one home of figure plumbing: matplotlib with its file-only backend (``Agg``, set once), a
figure or an image as PNG bytes, and PNG bytes as a ``data:`` URI that an HTML page inlines.

Applications draw with :func:`pyplot` and hand PNG bytes on (:class:`vitdecomp.results.Figure`); the
report and the sections inline them with :func:`png_data_uri`. matplotlib is imported on first use.
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


def thumbnail_data_uri(image: Any, size: int = 96) -> str:
    """A PIL image (or uint8 array) as a ``data:image/png;base64,...`` thumbnail (longest side ``size``)."""
    return png_data_uri(image_png(image, size))
