"""The few lines ``vitdecomp analyze`` prints at the end of a run."""

from __future__ import annotations

from vitdecomp.results import AnalysisResult


def summary(r: AnalysisResult, top: int = 3) -> str:
    """What was analysed, what was reused, and the ``top`` components of every feature."""
    a = r.alignment
    method = r.method()
    lines = [
        f"vitdecomp analyze: {r.model.name} ({r.model.weights_id}) read through {r.reader.name}",
        f"  images       {r.images.description}",
        f"  components   {r.n_components} (start layer {r.start_layer}); completeness max rel. error "
        f"{r.completeness.max_relative_error:.1e}",
        f"  alignment    {a.mode} ({a.state}), cosine on these images {_num(a.cosine_all_images)}"
        + (f"; aligner's own held-out cosine {_num(a.metrics['val_cosine'])}" if "val_cosine" in a.metrics else ""),
        f"  constant     {len(r.constant)} rank-1 components (no descriptions, no top images)",
        f"  cache        store rows computed {r.cache.store_rows_computed}, reused "
        f"{r.cache.store_rows_reused}; aligner {r.cache.aligner}",
        f"  top components per feature ({method} score; top description):",
    ]
    scores = r.scores[method]
    width = max((len(f) for f in scores), default=0)
    absent = r.absent_features()
    for f, row in scores.items():
        cells = []
        for lab in r.rankings[method][f][:top]:
            picks = r.descriptions.get(lab) or []
            cells.append(f"{lab} {row[lab]:.2f} ({picks[0].text if picks else '-'})")
        lines.append(f"    {f:<{width}}  " + "; ".join(cells) + ("  [not in these images]" if f in absent else ""))
    html = r.paths.html if r.paths is not None else ""
    lines.append(f"  report       {html}  ({r.timings_s.get('total', 0):.0f} s)")
    stages = [f"{k} {v:.1f}" for k, v in r.timings_s.items() if k != "total" and isinstance(v, (int, float))]
    if stages:
        lines.append("  time (s)     " + " · ".join(stages))
    lines.extend(f"  WARNING      {w}" for w in r.warnings)
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"
