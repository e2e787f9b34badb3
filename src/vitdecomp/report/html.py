"""Render the analysis results as one self-contained HTML page (inline CSS, images as data URIs).

No template engine and no script: the page is a few tables and cards built from the
:class:`~vitdecomp.report.results.AnalysisResult` whose serialisation is ``results.json`` (so a
page can be rendered again from that file: ``render_html(AnalysisResult.load(path))``).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vitdecomp.report.results import AnalysisResult

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --card:#fff; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(135deg,#1e3a8a,#2563eb); color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:650; letter-spacing:.2px; }
header p { margin:0; opacity:.85; }
main { padding:18px 32px 40px; max-width:1800px; }
h2 { font-size:17px; margin:26px 0 10px; }
h2 small { font-weight:400; color:var(--muted); font-size:13px; margin-left:6px; }
.stats { display:grid; grid-template-columns:repeat(auto-fill,minmax(210px,1fr)); gap:10px; margin-top:14px; }
.stat { background:rgba(255,255,255,.12); border-radius:8px; padding:8px 12px; }
.stat b { display:block; font-size:18px; font-weight:650; }
.stat span { font-size:12px; opacity:.85; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(300px,1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card h3 { margin:0 0 2px; font-size:15px; }
.card .sub { color:var(--muted); font-size:12px; margin-bottom:8px; }
.rank { display:grid; grid-template-columns:88px 1fr 44px; gap:6px; align-items:center; margin:3px 0; }
.rank code { font-size:12px; }
.bar { height:8px; border-radius:4px; background:#edf0f3; overflow:hidden; }
.bar i { display:block; height:100%; background:var(--accent); }
.bar i.neg { background:#dc2626; }
.rank .v { text-align:right; font-variant-numeric:tabular-nums; font-size:12px; color:var(--muted); }
.rank .d { grid-column:2 / 4; color:var(--muted); font-size:12px; margin-top:-3px; }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); border-radius:10px; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:middle; }
th { background:#f0f2f5; font-size:12px; text-align:left; position:sticky; top:0; }
th.f { text-align:center; min-width:62px; }
td.h { text-align:center; font-variant-numeric:tabular-nums; font-size:12px; min-width:62px; }
td.lab code { font-weight:600; }
td.kind { color:var(--muted); font-size:12px; }
.chips span { display:inline-block; background:#eef2ff; color:#3730a3; border-radius:10px; padding:1px 8px;
              margin:1px 2px; font-size:12px; white-space:nowrap; }
.chips i.const { color:var(--muted); font-size:12px; }
.chips span em { font-style:normal; color:#6366f1; font-size:11px; margin-left:3px; }
.thumbs { white-space:nowrap; }
.thumbs img { width:42px; height:42px; border-radius:4px; margin-right:3px; border:1px solid var(--line);
              image-rendering:auto; object-fit:cover; vertical-align:middle; }
.legend { display:flex; align-items:center; gap:8px; color:var(--muted); font-size:12px; margin:6px 0 10px; }
.legend .scale { width:220px; height:10px; border-radius:5px;
                 background:linear-gradient(90deg,rgba(220,38,38,1),#fff 50%,rgba(37,99,235,1));
                 border:1px solid var(--line); }
details { margin-top:14px; }
summary { cursor:pointer; font-weight:600; }
.note { color:var(--muted); font-size:12.5px; max-width:1100px; }
.kv { font-size:12px; color:var(--muted); word-break:break-all; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def thumbnail_data_uri(image: Any, size: int = 96) -> str:
    """A PIL image (or uint8 array) as a ``data:image/png;base64,...`` thumbnail (longest side ``size``)."""
    im = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    im = im.convert("RGB")
    if max(im.size) > size:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat(v: float) -> str:
    """Background / text colours for a score in [-1, 1] (blue positive, red negative)."""
    a = float(min(1.0, abs(v)))
    rgb = "37,99,235" if v >= 0 else "220,38,38"
    fg = "#fff" if a > 0.55 else "#1f2933"
    return f"background:rgba({rgb},{a:.3f});color:{fg}"


def _kind(label: str) -> str:
    last = label.split(".")[-1]
    if last.startswith("H") and last[1:].isdigit():
        return "head"
    return last


def _heat_table(r: AnalysisResult, method: str, thumbs: Mapping[str, list[str]] | None = None) -> str:
    scores = r.scores[method]
    feats = list(scores)
    head = "".join(f'<th class="f">{_e(f)}</th>' for f in feats)
    rows = []
    extra_head = "<th>top descriptions (share of variance)</th>" if thumbs is not None else ""
    img_head = "<th>top images</th>" if thumbs is not None else ""
    for lab in r.labels:
        cells = "".join(f'<td class="h" style="{_heat(scores[f][lab])}">{scores[f][lab]:+.2f}</td>' for f in feats)
        extra = ""
        picks = r.descriptions.get(lab, [])
        if thumbs is not None:
            chips = "".join(f"<span>{_e(d.text)}<em>{100 * d.explained:.0f}%</em></span>" for d in picks)
            if not chips:
                chips = '<i class="const">constant: the same vector for every image</i>'
            extra = f'<td class="chips">{chips}</td>'
            imgs = "".join(f'<img src="{u}" alt="">' for u in thumbs.get(lab, [])) if picks else ""
            cells += f'<td class="thumbs">{imgs}</td>'
        rows.append(
            f'<tr><td class="lab"><code>{_e(lab)}</code></td><td class="kind">{_e(_kind(lab))}</td>{extra}{cells}</tr>'
        )
    return (
        f"<table><thead><tr><th>component</th><th>kind</th>{extra_head}{head}{img_head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _feature_cards(r: AnalysisResult, top: int = 5) -> str:
    scores = r.scores["invariant"]
    cards = []
    for f, row in scores.items():
        ranks = []
        for lab in r.rankings["invariant"][f][:top]:
            v = row[lab]
            dtext = ", ".join(x.text for x in r.descriptions.get(lab, [])[:3]) or "-"
            cls = "" if v >= 0 else ' class="neg"'
            width = 100 * min(1.0, abs(v))
            ranks.append(
                f'<div class="rank"><code>{_e(lab)}</code><div class="bar"><i{cls} style="width:{width:.1f}%">'
                f'</i></div><span class="v">{v:+.2f}</span><span class="d">{_e(dtext)}</span></div>'
            )
        descr = ", ".join(r.features[f])
        cards.append(f'<div class="card"><h3>{_e(f)}</h3><div class="sub">{_e(descr)}</div>{"".join(ranks)}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _stats(r: AnalysisResult) -> str:
    a = r.alignment
    cos = a.held_out_cosine
    stats = [
        (f"{r.n_components}", "components"),
        (f"{r.images.n}", "images"),
        (f"{r.completeness.max_relative_error:.1e}", "max completeness error (sum of parts vs model)"),
        (f"{cos:.3f}" if cos is not None else "-", f"held-out cosine to CLIP ({a.mode}, {a.state})"),
        (f"{len(r.features)}", "features scored"),
    ]
    if "total" in r.timings_s:
        stats.append((f"{r.timings_s['total']:.0f} s", "run time"))
    return "".join(f'<div class="stat"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in stats)


def render_html(r: AnalysisResult, thumbs: Mapping[str, list[str]] | None = None) -> str:
    """The whole page for an analysis result (``thumbs``: image data URIs per component)."""
    a = r.alignment
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in r.timings_s.items() if isinstance(v, (int, float)))
    methods = [m for m in r.scores if m != "invariant"]
    other = "".join(
        f"<details><summary>Scores with the {_e(m)} method</summary>{_heat_table(r, m)}</details>" for m in methods
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitdecomp — {_e(r.model.name)}</title>
<style>{CSS}</style></head>
<body>
<header>
<h1>{_e(r.model.name)} <span style="opacity:.7;font-weight:400">read through</span> {_e(r.reader.name)}</h1>
<p>{_e(r.images.description)} · weights {_e(r.model.weights_id)} · CLIP {_e(r.reader.weights_id)}</p>
<div class="stats">{_stats(r)}</div>
</header>
<main>
<h2>Top components per feature
<small>rotation-invariant score; grey text: each component's top descriptions</small></h2>
{_feature_cards(r)}
<h2>Components <small>scores per feature (rotation-invariant), TextSpan descriptions, images where the
component's aligned contribution points most along its top description</small></h2>
<div class="legend"><span>-1</span><span class="scale"></span><span>+1</span>
<span>score = correlation of the component's variation inside the feature's text subspace with the whole
representation's</span></div>
{_heat_table(r, "invariant", thumbs or {})}
{other}
<h2>About these numbers</h2>
<p class="note">Each component's contribution is mapped into CLIP space ({_e(a.mode)} aligner,
lambda {a.lam:g}); descriptions are picked greedily from the vocabulary
<b>{_e(r.vocabulary.name)}</b> ({r.vocabulary.size} entries) by the variance they explain across
images (TextSpan). The <b>paper</b> score averages per-direction correlations over a QR basis of the feature's
descriptions and so depends on their order; the <b>invariant</b> score pools them over the whole feature
subspace and does not. Timings: {_e(timing)}.</p>
<p class="kv">store {_e(r.store.path)} (key {_e(r.store.key_digest)}) · aligner
{_e(r.aligner.path)}</p>
</main></body></html>
"""


def write_report(result: AnalysisResult, source: Any, out: str | Path, top_idx: np.ndarray) -> Path:
    """Write ``out/index.html``; ``source.image(i)`` gives the images of rows ``top_idx [C, n]``."""
    out = Path(out)
    cache: dict[int, str] = {}
    thumbs: dict[str, list[str]] = {}
    for c, lab in enumerate(tqdm(result.labels, desc="report", unit="comp", leave=False)):
        uris = []
        for j in np.asarray(top_idx[c]).tolist():
            if j not in cache:
                try:
                    cache[j] = thumbnail_data_uri(source.image(j))
                except Exception:  # an unreadable image must not sink the whole report
                    cache[j] = ""
            if cache[j]:
                uris.append(cache[j])
        thumbs[lab] = uris
    path = out / "index.html"
    path.write_text(render_html(result, thumbs), encoding="utf-8")
    return path
