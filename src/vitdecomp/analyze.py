"""``vitdecomp analyze``: decompose, store, align, describe and score every component; write a report.

One call of :func:`run_analysis` runs the whole method on one image set::

    images ─▶ decompose (subject model) ─┐
           ─▶ CLIP image embedding ──────┴▶ store (keyed, resumable, on disk)
    store ─▶ CompAlign (trained once and cached; identity when the subject is the CLIP model)
          ─▶ TextSpan descriptions per component (vocabulary embedded by CLIP's text tower, cached)
          ─▶ scores of every component for every feature ("paper" and the rotation-invariant score)
          ─▶ report folder: results.json + index.html (self-contained)

With no arguments it runs offline on the built-in default: the zoo's DeiT-like model read through
the zoo's CLIP, on :data:`DEFAULT_N_IMAGES` generated scenes of the built-in world drawn from
:data:`WORLD_SEED` — a seed none of the zoo's training, validation or probe sets used (they use
1000, 1001, 1500 and 2001, 2002). With ``images=DIR`` it reads an image folder and scores the
paper's features with the general vocabulary.

Caches live under ``cache_dir`` (default ``$VITDECOMP_CACHE`` or ``~/.cache/vitdecomp``):
``stores/`` (one folder per store key: model + weights, CLIP, start layer, component layout,
preprocessing, image set), ``aligners/`` (one folder per model setting, see
:func:`vitdecomp.align.aligner_dir`) and ``text/`` (text embeddings per CLIP weights + templates).
A rerun reuses all three; a cached aligner that does not fit the data is refused
(:class:`~vitdecomp.errors.MismatchError`), never silently retrained or applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdecomp.errors import MismatchError

#: Seed of the default (held-out) world image set; the zoo trained on 1000/1001 (+1500 for
#: validation) and its probes use 2001/2002 — see ``vitdecomp.zoo.train`` / ``zoo.evaluate``.
WORLD_SEED = 3000
DEFAULT_N_IMAGES = 2000
#: Prompt templates for the built-in world's descriptions (one word or a short phrase each).
WORLD_TEMPLATES: tuple[str, ...] = ("{}", "a {}", "a photo of {}", "a picture of {}")
METHODS = ("paper", "invariant")
#: Stores smaller than this are read into memory for training and scoring.
IN_MEMORY_BYTES = 1 << 30


def default_cache_dir() -> Path:
    """``$VITDECOMP_CACHE``, else ``$XDG_CACHE_HOME/vitdecomp``, else ``~/.cache/vitdecomp``."""
    env = os.environ.get("VITDECOMP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vitdecomp"


# ----------------------------------------------------------------------------------------------
# image sources


@dataclass
class ImageSource:
    """An image set: stable ids, batches of PIL images, and a way to fetch one image by id.

    ``key`` identifies the set for the store key; ``attributes`` holds the ground-truth attributes
    of generated world scenes (``None`` for folders).
    """

    ids: list[str]
    key: str
    description: str
    _get: Callable[[int], Any]
    attributes: dict[str, np.ndarray] | None = None
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int):
        """The PIL image of row ``index``."""
        return self._get(index)

    def batches(self, batch_size: int) -> Callable[[int], Iterator[tuple[list[str], list[Any]]]]:
        """A resumable batch source for :func:`vitdecomp.store.fill_store`: ``source(start)``."""

        def source(start: int) -> Iterator[tuple[list[str], list[Any]]]:
            for s in range(start, len(self.ids), batch_size):
                e = min(s + batch_size, len(self.ids))
                yield self.ids[s:e], [self._get(i) for i in range(s, e)]

        return source


def world_source(n: int = DEFAULT_N_IMAGES, seed: int = WORLD_SEED, size: int = 64) -> ImageSource:
    """``n`` generated scenes of the built-in world (deterministic in ``seed``)."""
    from PIL import Image

    from vitdecomp.world import make_scenes

    scenes = make_scenes(n, seed=seed, size=size)
    return ImageSource(
        ids=[f"world-{seed}-{i:06d}" for i in range(n)],
        key=f"world:seed={seed}:n={n}:size={size}",
        description=f"{n} generated scenes of the built-in world (seed {seed}, {size}x{size} px)",
        _get=lambda i: Image.fromarray(scenes.images[i]),
        attributes={k: np.asarray(v) for k, v in scenes.attributes.items()},
    )


def folder_source(folder: str | Path, n: int | None = None, skip_bad: bool = False) -> ImageSource:
    """The images under ``folder`` (sorted; the first ``n``). Unreadable files raise, or with
    ``skip_bad`` are dropped up front (and listed in ``errors``) so that row ids stay stable."""
    from vitdecomp.errors import ImageReadError
    from vitdecomp.imageset import list_images, read_image

    folder = Path(folder).resolve()
    paths = list_images(folder)
    if n is not None:
        paths = paths[:n]
    errors: list[str] = []
    if skip_bad:
        good = []
        for p in paths:
            try:
                read_image(p)
                good.append(p)
            except ImageReadError as err:
                errors.append(str(err))
        paths = good
    listing = hashlib.sha256()
    for p in paths:
        st = p.stat()
        listing.update(f"{p.relative_to(folder)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return ImageSource(
        ids=[str(p.relative_to(folder)) for p in paths],
        key=f"folder:{folder}:{len(paths)}:{listing.hexdigest()[:16]}",
        description=f"{len(paths)} images from {folder}",
        _get=lambda i: read_image(paths[i]),
        errors=errors,
    )


# ----------------------------------------------------------------------------------------------
# helpers


def _load(name: str, checkpoint: str | Path | None, random_init: bool, device: str):
    from vitdecomp.models.loading import load_model

    if name.startswith("zoo:"):
        kw = {"random_init": True} if random_init and checkpoint is None else {}
        return load_model(name, checkpoint=checkpoint, device=device, **kw)
    return load_model(name, pretrained=not random_init, checkpoint=checkpoint, device=device)


def _preprocess_batch(preprocess: Callable, images: Sequence[Any], device: str) -> torch.Tensor:
    return torch.stack([preprocess(im) for im in images]).to(device)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def build_store(
    subject: Any,
    teacher: Any,
    source: ImageSource,
    root: str | Path,
    *,
    start_layer: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> tuple[Any, Any, int]:
    """Open (or resume) the keyed store of ``subject``'s decompositions and ``teacher``'s CLIP image
    embeddings of ``source`` under ``root``; each model preprocesses the images its own way.
    Returns ``(store, key, rows computed now)``."""
    from vitdecomp import decompose
    from vitdecomp.store import StoreKey, fill_store, open_store

    first = _preprocess_batch(subject.preprocess, [source.image(0)], device)
    labels = decompose(subject, first, start_layer=start_layer).names
    key = StoreKey(
        model=subject.weights_id,
        clip=teacher.weights_id,
        labels=tuple(labels),
        start_layer=start_layer,
        preprocess=repr(subject.preprocess) + "\n--clip--\n" + repr(teacher.preprocess),
        images=source.key,
        extra={"representation": "default", "heads": True},
    )
    store = open_store(root, key, dtype=dtype)
    before = store.committed

    def decompose_fn(ims: list[Any]):
        return decompose(subject, _preprocess_batch(subject.preprocess, ims, device), start_layer=start_layer)

    @torch.no_grad()
    def clip_fn(ims: list[Any]) -> torch.Tensor:
        return teacher.model.encode_image(_preprocess_batch(teacher.preprocess, ims, device)).float()

    fill_store(store, source.batches(batch_size), decompose_fn, clip_fn, total=len(source), progress=progress)
    if store.committed != len(source) or store.ids != source.ids:
        raise MismatchError(f"store {store.path} holds {store.committed} rows, expected {len(source)}")
    return store, key, store.committed - before


def get_aligner(
    store: Any,
    key: Any,
    root: str | Path,
    *,
    aligner: str | Path | None = None,
    lam: float = 1.0,
    val_fraction: float = 0.1,
    max_steps: int = 3000,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[..., None] = print,
    rows: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, str, Path]:
    """The CompAlign aligner for ``store``'s model setting: ``aligner`` (a saved folder) if given, else
    the cached one under ``root`` (see :func:`vitdecomp.align.aligner_dir`), else trained from the
    store and cached (from ``rows``, the store's rows already in memory, when given; else from
    memory when the store is small, from its memmaps otherwise). A given or cached aligner trained
    for another setting is refused (:class:`MismatchError`).
    Returns ``(aligner, "given" | "loaded" | "trained", folder)``."""
    from vitdecomp.align import aligner_dir, load_aligner, save_aligner, train_aligner

    labels = store.labels
    if aligner is not None:
        return load_aligner(aligner, key=key, labels=labels, device=device), "given", Path(aligner)
    path = aligner_dir(root, key, "compalign", lam)
    if (path / "aligner.json").exists():
        try:
            return load_aligner(path, key=key, labels=labels, device=device), "loaded", path
        except MismatchError as err:
            raise MismatchError(
                f"the cached aligner at {path} does not fit this run: {err}. "
                "It will not be used; delete that folder to retrain it."
            ) from err
    c, d = store.shapes["contributions"]
    log(f"training CompAlign ({c} maps {d}->{store.shapes['clip'][0]}, lam={lam:g}) on {store.committed} images")
    rows = rows if rows is not None else store.in_memory(IN_MEMORY_BYTES)
    al = train_aligner(
        (rows["contributions"], rows["clip"]) if rows is not None else store,
        labels,
        mode="compalign",
        lam=lam,
        val_fraction=val_fraction,
        max_steps=max_steps,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    al.key = store.key.to_dict()
    al.metrics["trained_on"] = store.key.images
    save_aligner(al, path)
    return al, "trained", path


@torch.no_grad()
def completeness_errors(store, batch_size: int = 512) -> np.ndarray:
    """Relative error ``||sum_i c_i - z|| / ||z||`` of every stored image ``[N]``."""
    out = []
    for b in store.iter_batches(batch_size):
        total = b["contributions"].double().sum(1)
        ref = b["representation"].double()
        out.append(((total - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def top_images(
    store, aligner, directions: torch.Tensor, n: int = 4, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per component, the ``n`` images whose aligned contribution projects most on that component's
    direction ``directions [C, d_clip]`` (its top description): ``(indices [C, n], values [C, n])``."""
    dirs = torch.nn.functional.normalize(directions.float(), dim=-1).to(aligner.device)
    proj = []
    for b in store.iter_batches(batch_size):
        a = aligner.apply(b["contributions"])  # [b, C, d]
        proj.append((a * dirs[None]).sum(-1).cpu())
    p = torch.cat(proj)  # [N, C]
    k = min(n, p.shape[0])
    v, i = p.topk(k, dim=0)
    return i.T.numpy(), v.T.numpy()


# ----------------------------------------------------------------------------------------------
# the main job


def run_analysis(
    model: str = "zoo:deit",
    clip: str | None = "zoo:clip",
    images: str | Path | ImageSource | None = None,
    out: str | Path = "vitdecomp-out",
    *,
    features: str | Path | Mapping[str, Sequence[str]] | None = None,
    vocabulary: str | Path | None = None,
    start_layer: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    n_images: int | None = None,
    seed: int = WORLD_SEED,
    checkpoint: str | Path | None = None,
    clip_checkpoint: str | Path | None = None,
    random_init: bool = False,
    aligner: str | Path | None = None,
    val_fraction: float = 0.1,
    align_steps: int = 3000,
    align_batch_size: int = 256,
    lam: float | None = None,
    dtype: str = "float32",
    templates: Sequence[str] | None = None,
    top_k: int = 5,
    n_top_images: int = 4,
    skip_bad_images: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the whole method on one image set and write ``out/results.json`` and ``out/index.html``.

    ``model`` / ``clip``: names for :func:`vitdecomp.load_model` (``clip=None``: the subject must
    itself be a CLIP model, read through itself). ``images``: ``None`` (generated world scenes,
    ``n_images`` of them, default 2000, from ``seed``), an image folder, or an :class:`ImageSource`.
    ``features``: a feature spec for :func:`vitdecomp.score.load_features` (default: the world's
    attributes for world scenes, the paper's features for folders); ``vocabulary``: TextSpan's
    vocabulary (default ``"world"`` / ``"general"``). CompAlign is trained from the store with a
    seeded ``val_fraction`` held out (early-stopped on its cosine) unless an aligner is cached for
    this model setting or given as ``aligner`` (a folder written by
    :func:`vitdecomp.align.save_aligner`; refused if it was trained for another setting).
    ``lam`` defaults to the published normalisation (:data:`vitdecomp.align.DEFAULT_LAMBDA`).

    Returns the content of ``results.json`` (plus ``"paths"`` and ``"cache"`` entries saying what
    was reused and what was computed).
    """
    from vitdecomp.align import (
        DEFAULT_LAMBDA,
        identity_aligner,
    )
    from vitdecomp.align import evaluate as evaluate_aligner
    from vitdecomp.score import embed_features, load_features, score_features
    from vitdecomp.text import DEFAULT_TEMPLATES, TextEncoder, component_descriptions, load_vocabulary

    t_start = time.time()
    timings: dict[str, float] = {}
    log = print if verbose else (lambda *a, **k: None)
    lam = DEFAULT_LAMBDA if lam is None else float(lam)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    # ---------------------------------------------------------------- images
    t0 = time.time()
    if isinstance(images, ImageSource):
        source = images
    elif images is None:
        source = world_source(n_images or DEFAULT_N_IMAGES, seed=seed)
    else:
        source = folder_source(images, n_images, skip_bad=skip_bad_images)
    is_world = source.attributes is not None
    if len(source) < 2:
        raise ValueError(f"need at least 2 images, got {len(source)}")
    timings["images"] = time.time() - t0

    # ---------------------------------------------------------------- models
    t0 = time.time()
    subject = _load(model, checkpoint, random_init, device)
    if clip is None or (clip == model and clip_checkpoint in (None, checkpoint)):
        if not subject.is_clip:
            raise ValueError(f"{model} is not a CLIP model: give a CLIP model (clip=...) to read it with text")
        teacher = subject
    else:
        teacher = _load(clip, clip_checkpoint, random_init, device)
        if not teacher.is_clip:
            raise ValueError(f"--clip {clip} is not a CLIP model (it has no text tower)")
    identity = teacher is subject or (subject.is_clip and subject.weights_id == teacher.weights_id)
    timings["load_models"] = time.time() - t0

    # ---------------------------------------------------------------- store
    t0 = time.time()
    store, key, rows_computed = build_store(
        subject,
        teacher,
        source,
        cache / "stores",
        start_layer=start_layer,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    labels = store.labels
    before = store.committed - rows_computed
    timings["decompose_store"] = time.time() - t0
    err = completeness_errors(store)

    # small stores are read into memory once, for training, descriptions and scores
    rows = store.in_memory(IN_MEMORY_BYTES)

    # ---------------------------------------------------------------- aligner
    t0 = time.time()
    d_model = store.shapes["contributions"][1]
    d_clip = store.shapes["clip"][0]
    if identity:
        if d_model != d_clip:
            raise MismatchError(f"CLIP subject's contributions have {d_model} dims, its embedding {d_clip}")
        al = identity_aligner(labels, d_clip, key=key)
        aligner_state, aligner_path = "identity", None
    else:
        al, aligner_state, aligner_path = get_aligner(
            store,
            key,
            cache / "aligners",
            rows=rows,
            aligner=aligner,
            lam=lam,
            val_fraction=val_fraction,
            max_steps=align_steps,
            batch_size=align_batch_size,
            device=device,
            progress=progress,
            log=log,
        )
    al = al.to(device) if hasattr(al, "to") else al
    whole = evaluate_aligner(al, store)
    align_metrics = {
        "mode": al.mode,
        "lam": al.lam,
        "state": aligner_state,
        "cosine_all_images": whole["cosine"],
        **{k: v for k, v in al.metrics.items() if k != "history"},
    }
    timings["align"] = time.time() - t0

    # ---------------------------------------------------------------- text
    t0 = time.time()
    if features is None:
        features = "world" if is_world else "paper"
    feats = load_features(features)
    vocab_name = vocabulary if vocabulary is not None else ("world" if is_world else "general")
    vocab = load_vocabulary(vocab_name)
    templates = tuple(templates) if templates else (WORLD_TEMPLATES if is_world else DEFAULT_TEMPLATES)
    encoder = TextEncoder.from_loaded(teacher, cache_dir=cache / "text", device=device)
    vocab_emb = encoder.encode(vocab, templates)
    feat_emb = embed_features(lambda t: encoder.encode(t, templates), feats)
    timings["text"] = time.time() - t0

    # ---------------------------------------------------------------- descriptions + scores
    t0 = time.time()
    contribs = rows["contributions"] if rows is not None else store
    descr = component_descriptions(contribs, al, vocab_emb, vocab, k=top_k, progress=progress)
    timings["describe"] = time.time() - t0
    t0 = time.time()
    tables = score_features(contribs, al, feat_emb, methods=METHODS, progress=progress)
    timings["score"] = time.time() - t0

    # ---------------------------------------------------------------- top images
    t0 = time.time()
    top_dir = torch.stack([vocab_emb[d[0].index] if d else torch.zeros(d_clip) for d in descr.values()])  # [C, d_clip]
    idx, vals = top_images(store, al, top_dir, n=n_top_images)
    norms = _mean_norms(store, al)
    del rows, contribs
    timings["top_images"] = time.time() - t0

    # ---------------------------------------------------------------- results
    results: dict[str, Any] = {
        "format_version": 1,
        "model": {"name": subject.name, "weights_id": subject.weights_id, "is_clip": subject.is_clip},
        "clip": {"name": teacher.name, "weights_id": teacher.weights_id},
        "images": {
            "description": source.description,
            "key": source.key,
            "n": len(source),
            "skipped": source.errors,
        },
        "start_layer": start_layer,
        "labels": labels,
        "n_components": len(labels),
        "features": feats,
        "vocabulary": {"name": str(vocab_name), "size": len(vocab), "templates": list(templates)},
        "scores": {m: t.to_dict() for m, t in tables.items()},
        "rankings": {m: {f: [lab for lab, _ in t.ranking(f)] for f in t.features} for m, t in tables.items()},
        "descriptions": {
            lab: [{"text": d.text, "explained": d.explained, "projection": d.projection} for d in ds]
            for lab, ds in descr.items()
        },
        "mean_aligned_norm": {lab: float(v) for lab, v in zip(labels, norms, strict=True)},
        "top_images": {
            lab: [{"id": source.ids[j], "projection": float(v)} for j, v in zip(idx[c], vals[c], strict=True)]
            for c, lab in enumerate(labels)
        },
        "completeness": {
            "max_relative_error": float(err.max()),
            "mean_relative_error": float(err.mean()),
            "median_relative_error": float(np.median(err)),
        },
        "alignment": align_metrics,
        "store": {"path": str(store.path), "key": key.to_dict(), "key_digest": key.digest()},
        "aligner": {"path": None if aligner_path is None else str(aligner_path), "key": al.key},
        "cache": {
            "dir": str(cache),
            "store_rows_computed": rows_computed,
            "store_rows_reused": before,
            "aligner": aligner_state,
            "text_encoder_batches": encoder.calls,
        },
        "timings_s": timings,
    }
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from vitdecomp.report import write_report

    html_path = write_report(results, source, out, idx)
    timings["report"] = time.time() - t0
    timings["total"] = time.time() - t_start
    results["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    results["paths"] = {"out": str(out), "results": str(out / "results.json"), "html": str(html_path)}
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    if verbose:
        print(summary(results))
    return results


@torch.no_grad()
def _mean_norms(store, al, batch_size: int = 256) -> np.ndarray:
    total = None
    for b in store.iter_batches(batch_size):
        n = al.apply(b["contributions"]).norm(dim=-1).sum(0).cpu()
        total = n if total is None else total + n
    return (total / max(store.committed, 1)).numpy()


def summary(results: Mapping[str, Any], top: int = 3) -> str:
    """The few lines printed at the end of a run."""
    r = results
    a = r["alignment"]
    cos = a.get("val_cosine", a["cosine_all_images"])
    lines = [
        f"vitdecomp analyze: {r['model']['name']} ({r['model']['weights_id']}) read through {r['clip']['name']}",
        f"  images       {r['images']['description']}",
        f"  components   {r['n_components']} (start layer {r['start_layer']}); completeness max rel. error "
        f"{r['completeness']['max_relative_error']:.1e}",
        f"  alignment    {a['mode']} ({a['state']}), held-out cosine {cos:.3f}",
        f"  cache        store rows computed {r['cache']['store_rows_computed']}, reused "
        f"{r['cache']['store_rows_reused']}; aligner {r['cache']['aligner']}",
        "  top components per feature (rotation-invariant score; top description):",
    ]
    scores = r["scores"]["invariant"]
    width = max((len(f) for f in scores), default=0)
    for f, row in scores.items():
        best = r["rankings"]["invariant"][f][:top]
        cells = []
        for lab in best:
            d = r["descriptions"].get(lab) or [{"text": "-"}]
            cells.append(f"{lab} {row[lab]:.2f} ({d[0]['text']})")
        lines.append(f"    {f:<{width}}  " + "; ".join(cells))
    t = r.get("timings_s", {})
    lines.append(f"  report       {r.get('paths', {}).get('html', '')}  ({t.get('total', 0):.0f} s)")
    return "\n".join(lines)
