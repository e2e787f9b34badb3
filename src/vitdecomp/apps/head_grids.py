"""Figures of an analysis for the report: per feature, a layer x head grid of the heads' scores.

:func:`head_grid` gives the numbers (plain arrays plus labels); :func:`draw_head_grids` the PNG
(matplotlib, one panel per feature, a diverging scale centred on 0); :func:`head_grid_uri` one
feature's panel as a PNG ``data:`` URI (the report's per-feature view).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vitdecomp.figures import figure_png, png_data_uri, pyplot
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
    """One feature's layer x head grid (its own symmetric scale, each cell's score written in it) as
    a ``data:image/png;base64,...`` URI."""
    plt = pyplot()
    grid, rows = head_grid(result, feature, method)
    fig, ax = plt.subplots(figsize=(0.42 * grid.shape[1] + 1.6, 0.26 * len(rows) + 0.9), dpi=110)
    lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    shown = ax.imshow(grid, cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ink = "w" if abs(v) > 0.6 * (lim or 1.0) else "k"
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=5, color=ink)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(grid.shape[1])], fontsize=6)
    ax.set_title(f"{feature}: {method} score per head", fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.03).ax.tick_params(labelsize=6)
    return png_data_uri(figure_png(fig, bbox_inches="tight"))
