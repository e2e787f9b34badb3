"""The page ``vitdecomp retrieve`` writes: the ranked images, thumbnails inlined (:func:`gallery_page`)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

from vitdecomp.figures import thumbnail_data_uri


def gallery_page(title: str, rows: Sequence[dict[str, Any]], image_of: Callable[[int], Any]) -> str:
    """One self-contained HTML page of ranked images: ``rows`` (``id``, ``score``, and the tie-break
    ``full_cosine`` when ranked by example) best first, ``image_of(i)`` the PIL image of the ``i``-th row."""
    cells = "".join(
        f'<figure><img src="{thumbnail_data_uri(image_of(i))}">'
        f"<figcaption>{html.escape(r['id'])}<br>{r['score']:.3f}"
        + (f" · cos {r['full_cosine']:.3f}" if "full_cosine" in r else "")
        + "</figcaption></figure>"
        for i, r in enumerate(rows)
    )
    style = "figure{display:inline-block;margin:4px;font:11px sans-serif;text-align:center}"
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
        f"<h3>{html.escape(title)}</h3>{cells}"
    )
