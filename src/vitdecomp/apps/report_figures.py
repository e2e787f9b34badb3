"""The report's figures, computed at the end of ``vitdecomp analyze``: :func:`report_views` (the data
types they fill, :class:`~vitdecomp.results.ReportViews`, live in the results schema).

Per feature, the layer x head grid of the heads' scores and the top heads' heatmaps on the first
:data:`N_MAP_IMAGES` images; per head (the :data:`MAX_VIEW_HEADS` best-scored), its own map on its top
images along its top description; per feature, the images :data:`N_QUERIES` of its value texts find
through its top-k components. Every map is a directional token map (one decomposition of the few
images shown, at about the cost of a forward pass); retrieval reads the store already written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vitdecomp.apps.analysis import Analysis, analysis_of, auto_heads, auto_k
from vitdecomp.apps.head_grids import head_grid_uri
from vitdecomp.apps.heatmap import Heatmap, MapJob, heatmap_batch, heatmaps, overlay
from vitdecomp.apps.retrieval import gallery_of, text_scores, top_components
from vitdecomp.figures import jpeg_data_uri
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.results import AnalysisResult, ComponentView, FeatureView, Hit, ImageMap, ReportViews, RetrievalGallery
from vitdecomp.store import reopen_store

#: Images per feature on which the feature's top heads are mapped.
N_MAP_IMAGES = 4
#: Top images per head view.
N_VIEW_IMAGES = 2
#: Heads that get their own view: those with the highest score for any feature (the others' maps:
#: ``vitdecomp heatmap --report OUT --heads NAME``, from the store and the saved aligner).
MAX_VIEW_HEADS = 8
#: Heads whose views one token-map decomposition makes (their top images together).
VIEW_BATCH = 2
#: Text queries per feature (its first values) and images shown per query.
N_QUERIES = 3
N_HITS = 8
#: Longest side of a map figure, in pixels (smaller images are kept at their size).
MAP_SIZE = 128


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def _figures(images: list[Image.Image], ids: list[str], maps: list[Heatmap]) -> list[ImageMap]:
    """Maps (:class:`~vitdecomp.apps.heatmap.Heatmap`) as report figures."""
    return [
        ImageMap(
            i,
            hm.text,
            hm.heads,
            jpeg_data_uri(overlay(im, hm.original, min(MAP_SIZE, max(im.size)), hm.scale), MAP_SIZE),
        )
        for im, i, hm in zip(images, ids, maps, strict=True)
    ]


def _maps(analysis: Analysis, images: list[Image.Image], ids: list[str], **how: Any) -> list[ImageMap]:
    """The maps of :func:`vitdecomp.apps.heatmap.heatmaps` as report figures."""
    return _figures(images, ids, heatmaps(analysis, images, **how))


def feature_views(analysis: Analysis, images: list[Image.Image], ids: list[str]) -> list[FeatureView]:
    """Per feature: its head grid and its top heads' maps along, per image, the value of the feature
    the aligned whole representation reads best (no labels); every feature's maps from one
    decomposition of the images (:func:`~vitdecomp.apps.heatmap.heatmap_batch`)."""
    r = analysis.result
    heads = {f: auto_heads(analysis.scores(f), r.labels) for f in r.features}
    rows = list(range(len(images)))
    jobs = [MapJob(rows, heads[f], feature=f) for f in r.features]
    maps = heatmap_batch(analysis, images, jobs) if images and jobs else [[] for _ in jobs]
    return [
        FeatureView(f, head_grid_uri(r, f, r.method()), heads[f], _figures(images, ids, m))
        for f, m in zip(r.features, maps, strict=True)
    ]


def view_heads(result: AnalysisResult, n: int = MAX_VIEW_HEADS) -> list[str]:
    """The heads with a description and top images, best score for any feature first, at most ``n``."""
    table = result.scores[result.method()]
    heads = [lab for lab in result.labels if auto_heads({lab: 0.0}, [lab])]
    heads = [h for h in heads if result.descriptions.get(h) and result.top_images.get(h)]
    return sorted(heads, key=lambda h: -max(row.get(h, float("-inf")) for row in table.values()))[:n]


def component_views(analysis: Analysis, source: Any, bar: tqdm | None = None) -> dict[str, ComponentView]:
    """Each of :func:`view_heads`' heads alone on its top images, along its top description; one
    decomposition per :data:`VIEW_BATCH` heads (their top images together, :func:`view_batch`);
    ``bar`` advances by each batch's heads."""
    rows = {i: j for j, i in enumerate(source.ids)}
    heads = view_heads(analysis.result)
    out: dict[str, ComponentView] = {}
    for s in range(0, len(heads), VIEW_BATCH):
        out.update(view_batch(analysis, source, rows, heads[s : s + VIEW_BATCH]))
        if bar is not None:
            bar.update(len(heads[s : s + VIEW_BATCH]))
    return out


def view_batch(analysis: Analysis, source: Any, rows: dict[str, int], heads: list[str]) -> dict[str, ComponentView]:
    """The views of ``heads`` (``source`` ids -> its rows: ``rows``) from one token-map decomposition of
    their top images together; each head's maps are what :func:`~vitdecomp.apps.heatmap.heatmaps`
    gives for that head, its text and its images alone."""
    r = analysis.result
    texts = {h: r.descriptions[h][0].text for h in heads}
    ids = {h: [t.id for t in r.top_images[h][:N_VIEW_IMAGES] if t.id in rows] for h in heads}
    union = list(dict.fromkeys(i for h in heads for i in ids[h]))
    at = {i: j for j, i in enumerate(union)}
    images = [_pil(source.image(rows[i])) for i in union]
    live = [h for h in heads if ids[h]]
    jobs = [MapJob([at[i] for i in ids[h]], [h], texts[h]) for h in live]
    maps = dict(zip(live, heatmap_batch(analysis, images, jobs), strict=True)) if jobs else {}
    return {
        h: ComponentView(h, texts[h], _figures([images[at[i]] for i in ids[h]], ids[h], maps[h]) if h in maps else [])
        for h in heads
    }


def retrieval_galleries(
    analysis: Analysis, source: Any, batch_size: int = 1024, progress: bool = False
) -> list[RetrievalGallery]:
    """Per feature, its first :data:`N_QUERIES` values as texts, searched through its top
    ``auto_k(C)`` components over the whole analysed set; the :data:`N_HITS` best images each. One
    pass over the store for every feature, a running top :data:`N_HITS` per query (memory flat in the
    number of images)."""
    r = analysis.result
    k = auto_k(len(r.labels))
    queries = []  # (feature, components, texts, their embeddings [T, d_clip])
    for f, values in r.features.items():
        texts = list(values)[:N_QUERIES]
        queries.append((f, top_components(analysis.scores(f), k), texts, analysis.embed(texts)))
    best = [_RunningTop(N_HITS) for _ in queries]
    store = reopen_store(r.store.path)
    bar = tqdm(total=len(store), desc="galleries", unit="img", leave=False, disable=not progress)
    for rows in store.iter_batches(batch_size):
        bar.update(len(rows["contributions"]))
        g = gallery_of(analysis, rows["contributions"], [])
        for top, (_, comps, _, emb) in zip(best, queries, strict=True):
            top.add(torch.stack([text_scores(g, t, comps) for t in emb], 1))  # [b, T]
    bar.close()
    out = []
    for top, (f, comps, texts, _) in zip(best, queries, strict=True):
        for t, text in enumerate(texts):
            hits = [Hit(source.ids[j], v) for v, j in top.column(t)]
            out.append(RetrievalGallery(f, text, comps, hits))
    return out


class _RunningTop:
    """The ``n`` largest values of every column over batches of rows ``[b, T]``, with their rows."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0
        self.values: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def add(self, scores: torch.Tensor) -> None:
        rows = torch.arange(self.seen, self.seen + len(scores))[:, None].expand_as(scores)
        self.seen += len(scores)
        if self.values is not None and self.rows is not None:
            scores, rows = torch.cat([self.values, scores]), torch.cat([self.rows, rows])
        self.values, keep = scores.topk(min(self.n, len(scores)), dim=0)
        self.rows = rows.gather(0, keep)

    def column(self, t: int) -> list[tuple[float, int]]:
        """``[(value, row)]`` of column ``t``, best first."""
        assert self.values is not None and self.rows is not None
        return [(float(v), int(j)) for v, j in zip(self.values[:, t], self.rows[:, t], strict=True)]


@torch.no_grad()
def report_views(
    result: AnalysisResult, source: Any, subject: LoadedModel, reader: LoadedModel, progress: bool = True
) -> ReportViews:
    """Every figure of the report for an analysis just made (``source``: its image set, rows in
    store order; ``subject`` / ``reader``: the models it loaded)."""
    device = str(next(subject.model.parameters(), torch.empty(0)).device)
    analysis = analysis_of(result, subject, reader, out=".", device=device)
    n = min(N_MAP_IMAGES, len(source))
    images, ids = [_pil(source.image(i)) for i in range(n)], list(source.ids[:n])
    heads = view_heads(result)
    k, method = auto_k(len(result.labels)), result.method()
    total = len(result.features) + len(heads)  # the features' maps, then the heads' views
    with tqdm(total=total, desc="report maps (features, heads)", unit="map", leave=False, disable=not progress) as bar:
        features = feature_views(analysis, images, ids)
        bar.update(len(result.features))
        components = component_views(analysis, source, bar)
    return ReportViews(
        features=features,
        components=components,
        galleries=retrieval_galleries(analysis, source, progress=progress),
        rules=[
            f"Head grids: the {method} score of every attention head for the feature.",
            f"Top heads: the 2 ceil(sqrt(H)) heads with the highest {method} score (vitdecomp heatmap "
            "--heads auto); their maps on the first images of the set, for the value the aligned whole "
            "representation reads best (no labels), read against the feature's other values and shrunk by the "
            "image's null (vitdecomp.apps.specific). Red: the heads favour the value; blue: they favour another; "
            "each map on its own symmetric scale (that of the map before the null).",
            f"Head views: the {len(heads)} heads with the highest score for any feature (at most "
            f"{MAX_VIEW_HEADS}, to keep the page small), each alone on its top {N_VIEW_IMAGES} images along its "
            "top description; any other head's map on demand: vitdecomp heatmap --report OUT --text TEXT "
            "--heads NAME IMAGES.",
            f"Retrieval: cosine between a value's text and the aligned sum of the feature's top k = "
            f"2 ceil(sqrt(C)) = {k} components, over all {len(source)} images.",
        ],
    )
