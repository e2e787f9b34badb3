"""Retrieval through chosen components, brute force over an analysed image set.

* By text: rank images by the cosine between a text embedding and the aligned sum of the top-k
  components for a feature (``k`` = :func:`vitdecomp.apps.analysis.auto_k`, ``--k`` overrides), or
  the whole aligned representation without a feature.
* By example: images that share a reference's feature F, compared on F's top-k components only,
  through their zero-shot reading of F (the cosines with F's value texts, z-scored over the image
  set, a softmax at temperature 0.1): images whose F components read as the same value, so that what
  the components also carry about other features does not count.

``vitdecomp retrieve (--text T [--feature F] | --image PATH --feature F) [--k K] [--analysis DIR]``
writes ``ranking.json`` (image ids best first with scores, the components used) and
``gallery.html``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vitdecomp.apps.analysis import Analysis, auto_k, load_analysis
from vitdecomp.errors import VitDecompError
from vitdecomp.fsio import atomic_write_text
from vitdecomp.index import store_text_search

TOP_N = 20


@dataclass
class Gallery:
    """Aligned contributions of an image set: ``aligned [N, C, d_clip]``, ``bias [d_clip]``, names."""

    aligned: torch.Tensor
    bias: torch.Tensor
    labels: list[str]
    ids: list[str]

    def index(self, names: list[str]) -> list[int]:
        where = {lab: i for i, lab in enumerate(self.labels)}
        return [where[n] for n in names]

    def whole(self) -> torch.Tensor:
        """``[N, d_clip]``: the aligned whole representation."""
        return self.aligned.sum(1) + self.bias

    def part(self, names: list[str]) -> torch.Tensor:
        """``[N, d_clip]``: the aligned sum of the named components."""
        return self.aligned[:, self.index(names)].sum(1)


def top_components(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` components with the highest score."""
    return sorted(scores, key=lambda lab: -scores[lab])[:k]


def feature_basis(text_emb: torch.Tensor) -> torch.Tensor:
    """``[r, d]`` orthonormal rows spanning a feature's value embeddings ``[V, d]``."""
    q, r = torch.linalg.qr(text_emb.float().T)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep].T


def text_scores(gallery: Gallery, text_emb: torch.Tensor, components: list[str] | None) -> torch.Tensor:
    """``[N]`` cosine of each image's aligned components (all + bias when ``None``) with the text."""
    v = gallery.whole() if components is None else gallery.part(components)
    return F.normalize(v, dim=-1) @ F.normalize(text_emb.float(), dim=-1)


#: Temperature of the zero-shot reading image retrieval compares (on per-value z-scored cosines).
READING_TEMPERATURE = 0.1


def image_scores(
    gallery: Gallery,
    ref: int,
    components: list[str] | None,
    texts: torch.Tensor | None = None,
    how: str = "reading",
) -> torch.Tensor:
    """``[N]`` similarity to image ``ref`` on the chosen components (all when ``None``), centred over
    the image set. ``how``: ``"reading"`` (default, needs the feature's value ``texts [V, d]``): the
    components' zero-shot reading of the feature, ``softmax(z / T)`` of the cosines with the value
    texts z-scored over the set, compared by dot product — images whose components read as the same
    value; ``"span"``: cosine inside the span of the centred value texts; ``"cosine"``: plain cosine."""
    v = gallery.whole() if components is None else gallery.part(components)
    v = v - v.mean(0, keepdim=True)
    if how == "cosine":
        w = F.normalize(v, dim=-1)
        return w @ w[ref]
    if texts is None:
        raise VitDecompError(f"image retrieval '{how}' needs the feature's value texts")
    texts = texts.float()
    if how == "span":
        w = F.normalize(v @ feature_basis(texts - texts.mean(0, keepdim=True)).T, dim=-1)
        return w @ w[ref]
    z = F.normalize(v, dim=-1) @ F.normalize(texts, dim=-1).T  # [N, V]
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    p = torch.softmax(z / READING_TEMPERATURE, -1)
    return p @ p[ref]


def ranking(scores: torch.Tensor, ids: list[str], n: int = TOP_N, exclude: int | None = None) -> list[dict]:
    order = scores.argsort(descending=True).tolist()
    order = [i for i in order if i != exclude][:n]
    return [{"id": ids[i], "row": i, "score": float(scores[i])} for i in order]


@torch.no_grad()
def analysis_gallery(analysis: Analysis) -> Gallery:
    """The analysed image set's aligned contributions, read from its store."""
    from vitdecomp.store import ContributionStore

    store = ContributionStore(analysis.result.store.path)
    contrib = store.batch(slice(None))["contributions"]
    return gallery_of(analysis, contrib, list(store.ids))


@torch.no_grad()
def store_text_scores(
    analysis: Analysis, text_emb: torch.Tensor, components: list[str] | None, batch_size: int = 1024
) -> torch.Tensor:
    """``[N, T]``: :func:`text_scores` of every image of the analysed store with each text of
    ``text_emb [T, d_clip]``, read in batches of rows (the whole aligned store never in memory)."""
    from vitdecomp.store import ContributionStore

    out = []
    for rows in ContributionStore(analysis.result.store.path).iter_batches(batch_size):
        g = gallery_of(analysis, rows["contributions"], [])
        out.append(torch.stack([text_scores(g, t, components) for t in text_emb], 1))
    return torch.cat(out)


def gallery_of(analysis: Analysis, contributions: torch.Tensor, ids: list[str]) -> Gallery:
    """A gallery from contributions ``[N, C, D]`` in the analysis' component layout."""
    al = analysis.aligner
    if al is None:
        return Gallery(contributions.float(), torch.zeros(contributions.shape[-1]), analysis.result.labels, ids)
    return Gallery(al.apply(contributions), al.bias.float().cpu(), analysis.result.labels, ids)


def _thumb(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").resize((96, 96)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_gallery(path: Path, title: str, rows: list[dict], image_of) -> None:
    """One self-contained HTML page of the ranked images (thumbnails inlined), written atomically."""
    cells = "".join(
        f'<figure><img src="data:image/png;base64,{_thumb(image_of(r["row"]))}">'
        f"<figcaption>{html.escape(r['id'])}<br>{r['score']:.3f}</figcaption></figure>"
        for r in rows
    )
    style = "figure{display:inline-block;margin:4px;font:11px sans-serif;text-align:center}"
    atomic_write_text(
        path,
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
        f"<h3>{html.escape(title)}</h3>{cells}",
    )


def run(args: argparse.Namespace) -> int:
    analysis = load_analysis(args.analysis, checkpoint=args.checkpoint)
    gallery = analysis_gallery(analysis)
    k = args.k or auto_k(len(gallery.labels))
    comps = None if args.feature is None else top_components(analysis.scores(args.feature), k)
    if args.text is not None:
        query = analysis.embed([args.text])[0]  # FAISS index of the store, persisted beside it
        scores, exclude = store_text_search(analysis.result.store.path, analysis.aligner, comps, query, args.n), None
        title = f'"{args.text}"' + (f" through {args.feature} (top {k})" if comps else " (whole representation)")
    else:
        if args.feature is None:
            raise VitDecompError("--image needs --feature: the feature the images should share")
        in_set = args.image in gallery.ids
        exclude = gallery.ids.index(args.image) if in_set else _append_reference(analysis, gallery, args.image)
        texts = analysis.embed(list(analysis.result.features[args.feature]))
        scores = image_scores(gallery, exclude, comps, texts)
        title = f"same {args.feature} as {args.image} (top {k} components, read as {args.feature}'s values)"
    rows = ranking(scores, gallery.ids, args.n, exclude)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"query": title, "model": analysis.result.model.name, "components": comps, "k": k, "ranking": rows}
    root = analysis.result.images.root
    for r in rows:
        if root and not r["id"].startswith("world-"):
            r["path"] = str(Path(root) / r["id"])
    atomic_write_text(out / "ranking.json", json.dumps(doc, indent=1))
    load = _image_loader([r["id"] for r in rows], root)
    write_gallery(out / "gallery.html", title, rows, lambda i: load(gallery.ids[i]))
    print(f"{len(rows)} images in {out / 'ranking.json'}, {out / 'gallery.html'}")
    return 0


def _append_reference(analysis: Analysis, gallery: Gallery, path: str) -> int:
    """Decompose an outside reference image and append it to the gallery; its row."""
    from vitdecomp import decompose
    from vitdecomp.imageset import read_image

    x = analysis.subject.preprocess(read_image(path))[None]
    d = decompose(analysis.subject, x, start_layer=analysis.result.start_layer or 0)
    extra = gallery_of(analysis, d.contributions, [path])
    gallery.aligned = torch.cat([gallery.aligned, extra.aligned])
    gallery.ids = [*gallery.ids, path]
    return len(gallery.ids) - 1


def _image_loader(image_ids: list[str], root: str = ""):
    """``row id -> PIL image`` for the ids shown: files (relative to the analysed folder ``root``), or
    generated world scenes ``world-SEED-ROW`` (each seed's scenes made once)."""
    from vitdecomp.imageset import read_image
    from vitdecomp.world import make_scenes

    world: dict[int, int] = {}
    for i in image_ids:
        if i.startswith("world-"):
            _, seed, row = i.split("-")
            world[int(seed)] = max(world.get(int(seed), 0), int(row) + 1)
    scenes = {seed: make_scenes(n, seed=seed) for seed, n in world.items()}

    def load(image_id: str):
        if image_id.startswith("world-"):
            _, seed, row = image_id.split("-")
            return scenes[int(seed)].pil(int(row))
        return read_image(Path(root) / image_id if root else image_id)

    return load


def add_retrieve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "retrieve",
        help="search an analysed image set by text or by example, through a feature's components",
        description=__doc__.split("\n\n")[1],
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='a description, e.g. "a red object"')
    what.add_argument("--image", help="a reference image (path, or an id of the analysed set)")
    p.add_argument("--feature", help="read only this feature's top components (required with --image)")
    p.add_argument("--k", type=int, default=None, help="number of components (default 2 ceil(sqrt(C)))")
    p.add_argument("--n", type=int, default=TOP_N, help="images to return")
    p.add_argument("--analysis", default="vitdecomp-out", help="folder of a finished `vitdecomp analyze`")
    p.add_argument("--checkpoint", default=None, help="local weights of the analysed model, if it was given one")
    p.add_argument("--out", default="vitdecomp-retrieval", help="output folder")
    p.set_defaults(func=run)
    return p
