"""Render the analysis results as one self-contained HTML page (inline CSS, images as data URIs).

The page is built from Jinja2 templates in ``report/templates/``: ``base.html.j2`` (head, header,
then one partial per section), ``header.html.j2``, ``macros.html.j2`` (the heat table) and
``sections/<name>.html.j2``, one per entry of :data:`SECTIONS`, in that order. Every template reads
``r`` (the :class:`~vitdecomp.results.AnalysisResult` whose serialisation is ``results.json``,
so a page can be rendered again from that file: ``render_html(AnalysisResult.load(path))``),
``thumbs`` (label → thumbnail data URIs of its top images) and ``pictures`` (image id → thumbnail,
for the retrieval galleries). One small inline script (``templates/table.js``) sorts every sortable
table and filters the component table; nothing is fetched.

To add a section: write ``templates/sections/<name>.html.j2`` and put ``<name>`` in :data:`SECTIONS`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jinja2
import numpy as np
from tqdm.auto import tqdm

from vitdecomp.figures import thumbnail_data_uri
from vitdecomp.results import AnalysisResult
from vitdecomp.scores.registry import score_about

#: The page's sections, in order: ``templates/sections/<name>.html.j2`` each.
SECTIONS: list[str] = [
    "warnings",
    "features",
    "heads",
    "components",
    "retrieval",
    "applications",
    "other_methods",
    "about",
]


def _heat(v: float, scale: float = 1.0) -> str:
    """Background / text colours for a score in ``[-scale, scale]`` (blue positive, red negative; the
    text white on a strong colour, else the page's ink)."""
    a = float(min(1.0, abs(v) / scale)) if isinstance(v, (int, float)) and scale > 0 else 0.0
    rgb = "37,99,235" if v >= 0 else "220,38,38"
    return f"background:rgba({rgb},{a:.2f})" + (";color:#fff" if a > 0.55 else "")


def _sortvalue(v: object) -> str:
    """A score as a table cell's sort key (``data-v``): 6 significant digits, ``""`` for none."""
    return f"{v:.6g}" if isinstance(v, (int, float)) else ""


def _sortkey(cell: object) -> str:
    """The number a table cell's text starts with (``"12.5%"`` -> ``"12.5"``), ``""`` when none."""
    m = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", str(cell))
    return m.group(1) if m else ""


def _kind(label: str) -> str:
    last = label.split(".")[-1]
    if last.startswith("H") and last[1:].isdigit():
        return "head"
    return last


@functools.cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the report's templates (HTML autoescaped, undefined names an error)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vitdecomp.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["heat"] = _heat
    env.filters["kind"] = _kind
    env.filters["sortkey"] = _sortkey
    env.filters["sortvalue"] = _sortvalue
    return env


def _stats(r: AnalysisResult) -> list[tuple[str, str]]:
    """The header's figures: (value, what it is)."""
    a = r.alignment
    stats = [
        (f"{r.n_components}", "components"),
        (f"{r.images.n}", "images"),
        (f"{r.completeness.max_relative_error:.1e}", "max completeness error (sum of parts vs model)"),
        (_cos(a.cosine_all_images), f"cosine to CLIP on the analysed images ({a.mode}, {a.state})"),
    ]
    if "val_cosine" in a.metrics:
        stats.append((_cos(a.metrics["val_cosine"]), "aligner's own held-out cosine (on its training set)"))
    stats.append((f"{len(r.features)}", "features scored"))
    if "total" in r.timings_s:
        stats.append((f"{r.timings_s['total']:.0f} s", "run time"))
    return stats


def _cos(v: float | None) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def render_html(
    r: AnalysisResult, thumbs: Mapping[str, list[str]] | None = None, pictures: Mapping[str, str] | None = None
) -> str:
    """The whole page for an analysis result (``thumbs``: image data URIs per component;
    ``pictures``: image id -> data URI, the retrieval galleries' thumbnails)."""
    files = resources.files("vitdecomp.report").joinpath("templates")
    css = files.joinpath("style.css").read_text(encoding="utf-8")
    script = files.joinpath("table.js").read_text(encoding="utf-8")
    page = environment().get_template("base.html.j2")
    method = r.method()
    confidence = r.confidence.get(method, {}).get("scores", {})
    held: dict[str, str] = {}  # data URI -> its key: the page holds each image once

    def key(uri: str) -> str:
        return held.setdefault(uri, f"t{len(held)}") if uri else ""

    keyed = {lab: [key(u) for u in uris] for lab, uris in (thumbs or {}).items()}
    picture_keys = {i: key(u) for i, u in (pictures or {}).items()}
    return page.render(
        r=r,
        thumbs=keyed,
        pictures=picture_keys,
        thumb_data={k: u for u, k in held.items()},
        stats=_stats(r),
        css=css,
        script=script,
        sections=SECTIONS,
        method=method,
        confidence=confidence,
        about={m: score_about(m) for m in r.scores},
    )


def report_page(result: AnalysisResult, source: Any, top_idx: np.ndarray, progress: bool = True) -> str:
    """The page ``index.html`` holds; ``source.image(i)`` gives the images of rows ``top_idx [C, n]``
    (components without top images in ``result`` get none) and of the retrieval galleries' hits
    (``source.ids``)."""
    cache: dict[int, str] = {}

    def thumb(j: int) -> str:
        if j not in cache:
            try:
                cache[j] = thumbnail_data_uri(source.image(j))
            except Exception:  # an unreadable image must not sink the whole report
                cache[j] = ""
        return cache[j]

    thumbs: dict[str, list[str]] = {}
    for c, lab in enumerate(tqdm(result.labels, desc="report", unit="comp", leave=False, disable=not progress)):
        uris = [thumb(j) for j in np.asarray(top_idx[c]).tolist()] if result.top_images.get(lab) else []
        thumbs[lab] = [u for u in uris if u]
    hits = {h.id for g in (result.views.galleries if result.views else []) for h in g.hits}
    rows = {i: j for j, i in enumerate(source.ids)} if hits else {}
    pictures = {i: thumb(rows[i]) for i in hits if i in rows}
    return render_html(result, thumbs, pictures)


#: The page's record of the run it shows (``results.json``'s ``run_id``).
RUN_ID = re.compile(r'<meta name="vitdecomp-run" content="([^"]*)">')


def page_run_id(page: str) -> str | None:
    """The ``run_id`` of the analysis a page shows (``None``: a page written before run ids)."""
    found = RUN_ID.search(page[:4096])
    return found.group(1) if found else None
