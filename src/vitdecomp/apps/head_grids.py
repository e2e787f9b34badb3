"""Figures of an analysis for the report: per feature, a layer x head grid of the heads' scores.

:func:`head_grid` gives the numbers (plain arrays plus labels); :func:`draw_head_grids` the PNG
(matplotlib, one panel per feature, a diverging scale centred on 0); :func:`head_grid_uri` one
feature's panel as an SVG ``data:`` URI (the report's per-feature view, no matplotlib).
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

import numpy as np

from vitdecomp.figures import figure_png, pyplot
from vitdecomp.results import AnalysisResult

_HEAD = re.compile(r"^(?P<where>.+)\.H(?P<head>\d+)$")


def head_grid(result: AnalysisResult, feature: str, method: str = "invariant") -> tuple[np.ndarray, list[str]]:
    """``(scores [rows, max heads], row names)``: one row per attention layer (``L3``, ``S1.B0.grid``),
    in the analysis' component order; ``nan`` where a layer has fewer heads."""
    table = result.scores.get(method) or next(iter(result.scores.values()))
    rows: dict[str, dict[int, float]] = {}
    for label in result.labels:
        m = _HEAD.match(label)
        if m:
            rows.setdefault(m["where"], {})[int(m["head"])] = table[feature].get(label, np.nan)
    width = max((max(h) + 1 for h in rows.values()), default=0)
    grid = np.full((len(rows), width), np.nan)
    for i, heads in enumerate(rows.values()):
        for h, v in heads.items():
            grid[i, h] = v
    return grid, list(rows)


def draw_head_grids(result: AnalysisResult, path: str | Path, method: str = "invariant") -> Path:
    """One panel per feature: rows = attention layers, columns = heads, colour = the head's score."""
    plt = pyplot()
    features = list(result.features)
    grids = [head_grid(result, f, method) for f in features]
    n_rows = max((len(rows) for _, rows in grids), default=1)
    fig, axes = plt.subplots(1, len(features), figsize=(2.4 * len(features) + 1, 0.3 * n_rows + 1.4), dpi=110)
    axes = np.atleast_1d(axes)
    lim = max((np.nanmax(np.abs(g)) for g, _ in grids if g.size), default=1.0) or 1.0
    for i, (ax, f, (grid, rows)) in enumerate(zip(axes, features, grids, strict=True)):
        shown = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(f, fontsize=9)
        ax.set_yticks(range(len(rows)), rows if i == 0 else [], fontsize=6)
        ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])], fontsize=6)
    fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.02, label=f"{method} score")
    fig.suptitle(f"{result.model.name}: head scores per feature", fontsize=9, y=1.04)
    path = Path(path)
    path.write_bytes(figure_png(fig, bbox_inches="tight"))
    return path


def head_grid_uri(result: AnalysisResult, feature: str, method: str = "invariant") -> str:
    """One feature's layer x head grid (its own symmetric scale, red positive, blue negative, each
    cell's score written in it) as a ``data:image/svg+xml;base64,...`` URI: drawn as SVG text, no
    matplotlib (a few KB and a millisecond per grid)."""
    grid, rows = head_grid(result, feature, method)
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0
    lim = lim or 1.0
    cw, ch, left, top = 26, 14, 6 + 6 * max((len(r) for r in rows), default=1), 28
    width, height = left + cw * grid.shape[1] + 4, top + ch * len(rows) + 4
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
        f'<text x="{left}" y="10" font-size="9">{escape(feature)}: {escape(method)} score per head</text>',
    ]
    out.append('<g font-size="7" text-anchor="middle">')
    out += [f'<text x="{left + cw * h + cw // 2}" y="{top - 4}">H{h}</text>' for h in range(grid.shape[1])]
    out.append('</g><g font-size="7" text-anchor="end">')
    out += [f'<text x="{left - 3}" y="{top + ch * i + ch - 4}">{escape(name)}</text>' for i, name in enumerate(rows)]
    cells, ink = [], []  # rectangles, then the scores written in them (one group: shared attributes)
    for i in range(len(rows)):
        y = top + ch * i
        for j, v in enumerate(grid[i]):
            if np.isfinite(v):
                fill = _diverging(v / lim)
                cells.append(f'<rect x="{left + cw * j}" y="{y}" width="{cw}" height="{ch}" fill="{fill}"/>')
                white = ' fill="#fff"' if abs(v) > 0.6 * lim else ""
                ink.append(f'<text x="{left + cw * j + cw // 2}" y="{y + ch - 4}"{white}>{v:.2g}</text>')
    out += ["</g>", *cells, '<g font-size="6" text-anchor="middle">', *ink, "</g></svg>"]
    return "data:image/svg+xml;base64," + base64.b64encode("".join(out).encode()).decode("ascii")


def _diverging(t: float) -> str:
    """``t`` in [-1, 1] as a colour: blue (-1) through white (0) to red (+1)."""
    t = max(-1.0, min(1.0, float(t)))
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    r, g, b = (round(255 + (e - 255) * abs(t)) for e in end)
    return f"#{r:02x}{g:02x}{b:02x}"
