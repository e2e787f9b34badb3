"""The stages of one analysis, each a function of plain data that a notebook can call on its own::

    image source ─▶ models (subject + reader) ─▶ store (decompositions + reader embeddings, keyed,
    resumable) ─▶ aligner (identity, given, cached or trained CompAlign) ─▶ text space (features and
    vocabulary embedded by the reader's text tower, cached) ─▶ descriptions (TextSpan) ─▶ scores
    ─▶ top images ─▶ :class:`~vitdecomp.results.AnalysisResult`

The *reader* is the CLIP model whose text space names the components (``--clip``). The stages
after the store read rows through the :class:`~vitdecomp.store.Rows` protocol: a small store is read
into memory once (:func:`readable_rows`), a large one is streamed chunk by chunk from its zarr
arrays (training draws its batches from windows of chunks). The store is filled in this process
(:func:`fill_in_process`) or by Ray actors (:mod:`vitdecomp.pipeline.runners`). Caches live
under one root: ``stores/`` (one folder per store key: model + weights, reader, start layer,
component layout, preprocessing, image set), ``aligners/`` (one folder per model setting, see
:func:`vitdecomp.align.aligner_dir`) and ``text/`` (text embeddings per reader weights + templates).
A cached aligner that does not fit the data is refused (:class:`~vitdecomp.errors.MismatchError`),
never silently retrained or applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdecomp import LoadedModel, decompose, load_model
from vitdecomp.align import (
    DEFAULT_LAMBDA,
    Aligner,
    aligner_dir,
    evaluate,
    identity_aligner,
    load_aligner,
    save_aligner,
    train_aligner,
)
from vitdecomp.components import Decomposition
from vitdecomp.errors import CacheError, MismatchError, NonFiniteInputError, UsageError, one_line
from vitdecomp.fsio import writing
from vitdecomp.imageset import ImageSource
from vitdecomp.results import (
    AlignerInfo,
    Alignment,
    AnalysisResult,
    CacheInfo,
    Completeness,
    ImagesInfo,
    ModelInfo,
    Pick,
    ReaderInfo,
    StoreInfo,
    TopImage,
    VocabularyInfo,
)
from vitdecomp.scores import DEFAULT_SCORE, ScoreTable, analysis_scores, embed_features, load_features, score_confidence
from vitdecomp.store import ContributionStore, Rows, StoreKey, StoreLock, open_store, store_dir
from vitdecomp.text import DEFAULT_TEMPLATES, WORLD_TEMPLATES, Description, TextEncoder, load_vocabulary

#: Stores smaller than this (as float32) are read into memory for training, descriptions and scores;
#: larger ones are streamed.
IN_MEMORY_BYTES = 1 << 30
#: Bootstrap resamples and null draws behind every score's interval and p-value (``results.json``
#: ``confidence``); 19 null draws make "above every null draw" a test at p = 0.05.
N_BOOT = 100
N_NULL = 19

#: One batch from an image source: ``(image ids, images)``; ``images`` is whatever the callables take.
Batch = tuple[Sequence[str], Any]


# ----------------------------------------------------------------------------------------------
# models


def load_model_for(
    name: str,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str = "cpu",
    seed: int | None = None,
) -> LoadedModel:
    """:func:`vitdecomp.load_model` with one meaning of ``random_init`` for every name: random
    weights, drawn from ``seed`` when given (its ``weights_id`` then ends in ``:seed=<seed>``, so
    caches keep draws apart; ``None``: torch's current random state, the id without a seed); a zoo
    model given a ``checkpoint`` loads that checkpoint."""
    seeded = random_init and checkpoint is None and seed is not None
    with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(seed)
        if name.startswith("zoo:"):
            kw = {"random_init": True} if random_init and checkpoint is None else {}
            loaded = load_model(name, checkpoint=checkpoint, device=device, **kw)
        else:
            loaded = load_model(name, pretrained=not random_init, checkpoint=checkpoint, device=device)
    if seeded:
        loaded.weights_id = f"{loaded.weights_id}:seed={seed}"
    return loaded


@dataclass
class Models:
    """The subject (the model decomposed) and the reader (the CLIP model that reads its parts)."""

    subject: LoadedModel
    reader: LoadedModel

    @property
    def identity(self) -> bool:
        """The subject is the reader: its contributions already live in the reader's image space."""
        s, r = self.subject, self.reader
        return r is s or (s.is_clip and s.weights_id == r.weights_id)


def load_models(
    model: str,
    reader: str | None = "zoo:clip",
    *,
    checkpoint: str | Path | None = None,
    reader_checkpoint: str | Path | None = None,
    random_init: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Models:
    """Load the subject and the reader (``reader=None`` or the subject's own name: the subject reads
    itself and must be a CLIP model); ``random_init`` weights are drawn from ``seed`` (the reader's
    from ``seed + 1``). The reader is loaded first: a reader that is not a CLIP fails before the
    subject is loaded."""
    if reader is None or (reader == model and reader_checkpoint in (None, checkpoint)):
        subject = load_model_for(model, checkpoint, random_init, device, seed)
        if not subject.is_clip:
            raise UsageError(f"{model} is not a CLIP model: give a CLIP model (--clip) to read it with text")
        return Models(subject, subject)
    loaded = load_model_for(reader, reader_checkpoint, random_init, device, seed + 1)
    if not loaded.is_clip:
        raise UsageError(f"--clip {reader} is not a CLIP model (it has no text tower): give a CLIP, e.g. zoo:clip")
    return Models(load_model_for(model, checkpoint, random_init, device, seed), loaded)


# ----------------------------------------------------------------------------------------------
# store


def _preprocess_batch(preprocess: Callable, images: Sequence[Any], device: str) -> torch.Tensor:
    return torch.stack([preprocess(im) for im in images]).to(device)


def store_key(models: Models, source: ImageSource, start_layer: int = 0, device: str = "cpu") -> StoreKey:
    """Everything that changes the stored numbers; the component layout is read off a
    decomposition of the first image."""
    subject, reader = models.subject, models.reader
    first = _preprocess_batch(subject.preprocess, [source.image(0)], device)
    try:
        labels = decompose(subject, first, start_layer=start_layer).names
    except ValueError as err:
        if str(err).startswith("start_layer"):
            raise UsageError(f"--start-layer {start_layer}: {err}") from err
        raise
    return StoreKey(
        model=subject.weights_id,
        clip=reader.weights_id,
        labels=tuple(labels),
        start_layer=start_layer,
        preprocess=repr(subject.preprocess) + "\n--clip--\n" + repr(reader.preprocess),
        images=source.key,
        extra={"representation": "default", "heads": True},
    )


def fill_store(
    store: ContributionStore,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    decompose_fn: Callable[[Any], Decomposition],
    embed_fn: Callable[[Any], torch.Tensor],
    *,
    total: int | None = None,
    progress: bool = True,
) -> ContributionStore:
    """Decompose and embed every image of ``batches`` into ``store``, resuming where it stopped.

    ``batches`` yields ``(ids, images)``; ``images`` goes unchanged to ``decompose_fn(images) ->
    Decomposition`` (``contributions [B, C, D]``) and ``embed_fn(images) -> [B, d_clip]`` (the
    reader's image embedding), so each does its own preprocessing. Rows already committed are
    skipped (their ids must match, otherwise :class:`MismatchError`); pass a callable
    ``batches(start)`` to let the source skip reading them. Rows are held until they complete the
    store's current chunk (at most one chunk in memory), then written and committed together: an
    interruption loses at most the chunk under way. ``total`` sizes the progress bar.
    """
    done = store.committed
    stored_ids = store.ids
    source = batches(done) if callable(batches) else batches
    position = done if callable(batches) else 0
    pending = _PendingRows()
    bar = tqdm(total=total, initial=done, desc="decompose + CLIP", unit="img", disable=not progress)
    try:
        for ids, images in source:
            ids = [str(i) for i in ids]
            b = len(ids)
            skip = min(max(done - position, 0), b)
            if skip and ids[:skip] != stored_ids[position : position + skip]:
                raise MismatchError(
                    f"image ids {ids[:skip][:3]} differ from the store's rows {position}..{position + skip} "
                    f"({stored_ids[position : position + skip][:3]}): the image source changed since the "
                    "store was written"
                )
            position += b
            if skip == b:
                continue
            if skip:
                images, ids = images[skip:], ids[skip:]
            with torch.no_grad():
                try:
                    dec = decompose_fn(images)
                except NonFiniteInputError as err:
                    raise NonFiniteInputError.of([ids[i] for i in err.positions] or err.names) from err
                emb = embed_fn(images)
            if not store.shapes:  # the first rows fix the arrays' dims and the chunk size
                store.allocate(0, int(dec.contributions.shape[-1]), int(emb.shape[-1]), expected_rows=total)
            pending.add(ids, dec, emb)
            if pending.completes_chunk(store):
                bar.update(pending.flush(store))
        bar.update(pending.flush(store))
    finally:
        bar.close()
        store.close()
    return store


@dataclass
class _PendingRows:
    """Decomposed rows not yet written: ids, ``contributions [b, C, D]``, ``representation [b, D]``,
    reader embeddings ``[b, d_clip]`` (on the CPU), per batch."""

    ids: list[str] = field(default_factory=list)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    names: list[str] | None = None

    def add(self, ids: list[str], dec: Decomposition, emb: torch.Tensor) -> None:
        self.ids.extend(ids)
        self.parts.append((dec.contributions.detach().cpu(), dec.representation.detach().cpu(), emb.detach().cpu()))
        self.names = list(dec.names)

    def completes_chunk(self, store: ContributionStore) -> bool:
        """The held rows reach the end of the chunk that the store's next row falls in."""
        r = store.chunk_rows
        return store.committed + len(self.ids) >= (store.committed // r + 1) * r

    def flush(self, store: ContributionStore) -> int:
        """Append (write and commit) the held rows; how many there were."""
        n = len(self.ids)
        if n:
            c, z, e = (torch.cat(x) for x in zip(*self.parts, strict=True))
            store.append(self.ids, c, z, e, labels=self.names)
        self.ids, self.parts = [], []
        return n


@dataclass
class BuiltStore:
    """A filled store, its key, and how many of its rows this run computed."""

    store: ContributionStore
    key: StoreKey
    rows_computed: int

    @property
    def rows_reused(self) -> int:
        return self.store.committed - self.rows_computed


#: Fills an opened store with the models' rows of an image set: ``fill(store, models, source,
#: start_layer=, batch_size=, device=, progress=)``; :func:`fill_in_process` by default, Ray actors
#: with :class:`vitdecomp.pipeline.runners.RayRunner`.
StoreFiller = Callable[..., None]


def build_store(
    models: Models,
    source: ImageSource,
    root: str | Path,
    *,
    start_layer: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    fill: StoreFiller | None = None,
    chunk_rows: int | None = None,
) -> BuiltStore:
    """Open (or resume) the keyed store under ``root`` (a folder or an fsspec URL) of the subject's
    decompositions and the reader's image embeddings of ``source`` and fill it with ``fill``
    (default: in this process); each model preprocesses the images its own way. The models run
    here: the store only writes and reads rows. ``chunk_rows``: rows per chunk of a new store."""
    key = store_key(models, source, start_layer, device)
    with StoreLock(store_dir(root, key, dtype)):
        store = open_store(root, key, dtype=dtype, chunk_rows=chunk_rows)
        before = store.committed
        (fill or fill_in_process)(
            store, models, source, start_layer=start_layer, batch_size=batch_size, device=device, progress=progress
        )
        store = open_store(root, key, dtype=dtype)  # what is committed now, whoever wrote it
    if store.committed != len(source) or store.ids != source.ids:
        raise MismatchError(f"store {store.path} holds {store.committed} rows, expected {len(source)}")
    return BuiltStore(store, key, store.committed - before)


def model_fns(
    models: Models, start_layer: int, device: str
) -> tuple[Callable[[list[Any]], Decomposition], Callable[[list[Any]], torch.Tensor]]:
    """``(decompose_fn, embed_fn)`` of PIL images: the subject's decomposition (``contributions
    [B, C, D]``) and the reader's image embedding ``[B, d_clip]``, each model preprocessing the
    images its own way."""
    subject, reader = models.subject, models.reader

    def decompose_fn(ims: list[Any]) -> Decomposition:
        return decompose(subject, _preprocess_batch(subject.preprocess, ims, device), start_layer=start_layer)

    def embed_fn(ims: list[Any]) -> torch.Tensor:
        return reader.model.encode_image(_preprocess_batch(reader.preprocess, ims, device)).float()

    return decompose_fn, embed_fn


def fill_in_process(
    store: ContributionStore,
    models: Models,
    source: ImageSource,
    *,
    start_layer: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """:func:`fill_store` in this process with the subject's decompositions and the reader's
    embeddings (a folder's images decoded by a ``DataLoader`` with workers, see :mod:`vitdecomp.imageset`)."""
    decompose_fn, embed_fn = model_fns(models, start_layer, device)
    fill_store(store, source.batches(batch_size), decompose_fn, embed_fn, total=len(source), progress=progress)


def readable_rows(store: ContributionStore, max_bytes: int = IN_MEMORY_BYTES) -> Rows:
    """The store's rows in memory when they take at most ``max_bytes`` as float32, else the store
    itself: every reader then streams it chunk by chunk, in bounded memory."""
    in_memory = store.in_memory(max_bytes)
    return store if in_memory is None else in_memory


@torch.no_grad()
def completeness_errors(rows: Rows, batch_size: int = 512) -> np.ndarray:
    """Relative error ``||sum_i c_i - z|| / ||z||`` of every image ``[N]``."""
    out = []
    for b in rows.iter_batches(batch_size):
        total = b["contributions"].double().sum(1)
        ref = b["representation"].double()
        out.append(((total - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------------------------
# aligner


@dataclass
class AlignerStage:
    """The aligner, where it came from (``state``: identity, given, loaded, trained), its folder
    (``None`` for the identity) and the cosine of the aligned whole to the reader's embedding over
    every image."""

    aligner: Aligner
    state: str
    path: Path | None
    cosine_all_images: float | None = None


#: An aligner is cached only when trained for at least this many steps (``--align-steps 0`` is untrained).
MIN_CACHED_STEPS = 1


def aligner_cache_dir(
    root: str | Path, key: StoreKey, lam: float, options: Mapping[str, Any], mode: str = "compalign"
) -> Path:
    """The cache folder of the aligner trained on the store ``key`` (model, reader, layout *and*
    image set) with ``lam`` and the training ``options`` (steps, batch size, held-out share)."""
    base = aligner_dir(root, key, mode, lam)
    blob = json.dumps({"images": key.images, **options}, sort_keys=True, default=str)
    return base.with_name(f"{base.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}")


def get_aligner(
    rows: Rows,
    root: str | Path,
    *,
    given: str | Path | None = None,
    lam: float = DEFAULT_LAMBDA,
    val_fraction: float = 0.1,
    max_steps: int = 3000,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[..., None] = print,
) -> AlignerStage:
    """The CompAlign aligner for ``rows`` (a store's, with its key): ``given`` (a saved folder) if
    set, else the cached one under ``root`` for this store key, ``lam`` and training options (see
    :func:`aligner_cache_dir`), else trained from ``rows`` and cached (atomically: a folder renamed
    into place). A given or cached aligner trained for another setting is refused
    (:class:`MismatchError`); one that cannot be read is reported by path (:class:`CacheError`).
    With ``max_steps`` 0 the aligner is untrained: used, reported as such, never cached."""
    key, labels = rows.key, rows.labels
    if key is None:
        raise ValueError("get_aligner needs rows with a store key (a store, or its rows in memory)")
    if given is not None:
        return AlignerStage(_read_aligner(given, key, labels, device, "--aligner"), "given", Path(given))
    options = {"val_fraction": val_fraction, "max_steps": max_steps, "batch_size": batch_size}
    path = aligner_cache_dir(root, key, lam, options)
    if (path / "aligner.json").exists():
        return AlignerStage(_read_aligner(path, key, labels, device, None), "loaded", path)
    c, d = rows.shapes["contributions"]
    log(f"training CompAlign ({c} maps {d}->{rows.shapes['clip'][0]}, lam={lam:g}) on {len(rows)} images")
    al = train_aligner(rows, labels, mode="compalign", lam=lam, device=device, progress=progress, **options)
    al.key = key.to_dict()
    al.metrics["trained_on"] = key.images
    if max_steps < MIN_CACHED_STEPS:
        return AlignerStage(al, "untrained", None)
    _save_aligner_atomically(al, path)
    return AlignerStage(al, "trained", path)


def _read_aligner(
    path: str | Path, key: StoreKey, labels: Sequence[str] | None, device: str, flag: str | None
) -> Aligner:
    """:func:`load_aligner`, with a damaged folder reported by path and how to rebuild it."""
    try:
        return load_aligner(path, key=key, labels=labels, device=device)
    except MismatchError as err:
        fix = "give the aligner trained for this run" if flag else "delete that folder to retrain it"
        raise MismatchError(f"the aligner at {path} does not fit this run: {one_line(err)}; {fix}") from err
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        fix = f"give a folder written by save_aligner to {flag}" if flag else f"delete it (rm -r '{path}') and rerun"
        raise CacheError(
            f"cannot read the aligner at {path} ({type(err).__name__}: {one_line(err)[:120]}); {fix}"
        ) from err


def _save_aligner_atomically(aligner: Aligner, path: Path) -> None:
    """Save into a temporary folder beside ``path`` and rename it into place (a kill leaves no half
    aligner; a concurrent run that saved first wins, this copy is dropped)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        shutil.rmtree(tmp, ignore_errors=True)
        save_aligner(aligner, tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "aligner.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)


def align_components(
    rows: Rows, root: str | Path, *, identity: bool, device: str = "cpu", **options: Any
) -> AlignerStage:
    """The identity map when the subject is the reader (``identity``), else :func:`get_aligner`
    (``options`` go to it); measured by its cosine to the reader's embedding over every image."""
    if identity:
        d_model, d_clip = rows.shapes["contributions"][1], rows.shapes["clip"][0]
        if d_model != d_clip:
            raise MismatchError(f"CLIP subject's contributions have {d_model} dims, its embedding {d_clip}")
        stage = AlignerStage(identity_aligner(rows.labels, d_clip, key=rows.key), "identity", None)
    else:
        stage = get_aligner(rows, root, device=device, **options)
    stage.aligner = stage.aligner.to(device)
    stage.cosine_all_images = evaluate(stage.aligner, rows)["cosine"]
    return stage


# ----------------------------------------------------------------------------------------------
# text, descriptions, top images


@dataclass
class TextSpace:
    """The features and the vocabulary, embedded by the reader's text tower."""

    features: dict[str, list[str]]
    feature_emb: dict[str, torch.Tensor]
    vocabulary_name: str
    vocabulary: list[str]
    vocabulary_emb: torch.Tensor
    templates: tuple[str, ...]
    encoder_batches: int


def text_space(
    reader: LoadedModel,
    cache_dir: str | Path | None,
    *,
    world: bool,
    features: str | Path | Mapping[str, Sequence[str]] | None = None,
    vocabulary: str | Path | None = None,
    templates: Sequence[str] | None = None,
    device: str = "cpu",
) -> TextSpace:
    """Embed the features and the vocabulary (defaults: the world's for world scenes, else the
    paper's features and the general vocabulary) under the prompt ``templates``."""
    feats = load_features(features if features is not None else ("world" if world else "paper"))
    vocab_name = vocabulary if vocabulary is not None else ("world" if world else "general")
    vocab = load_vocabulary(vocab_name)
    templates = tuple(templates) if templates else (WORLD_TEMPLATES if world else DEFAULT_TEMPLATES)
    encoder = TextEncoder.from_loaded(reader, cache_dir=cache_dir, device=device)
    vocab_emb = encoder.encode(vocab, templates)
    feat_emb = embed_features(lambda t: encoder.encode(t, templates), feats)
    return TextSpace(feats, feat_emb, str(vocab_name), vocab, vocab_emb, templates, encoder.calls)


def top_directions(descriptions: Mapping[str, list[Description]], vocabulary_emb: torch.Tensor) -> torch.Tensor:
    """Per component, the embedding of its top description (zeros without one): ``[C, d_clip]``."""
    zero = torch.zeros(vocabulary_emb.shape[1])
    return torch.stack([vocabulary_emb[d[0].index] if d else zero for d in descriptions.values()])


@torch.no_grad()
def top_images(
    rows: Rows, aligner: Aligner, directions: torch.Tensor, n: int = 4, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per component, the ``n`` images whose aligned contribution projects most on that component's
    direction ``directions [C, d_clip]`` (its top description): ``(indices [C, n], values [C, n])``."""
    dirs = torch.nn.functional.normalize(directions.float(), dim=-1).to(aligner.device)
    best_v = torch.empty(0, dirs.shape[0])
    best_i = torch.empty(0, dirs.shape[0], dtype=torch.long)
    start = 0
    for b in rows.iter_batches(batch_size):  # a running top n: memory does not grow with the images
        p = (aligner.apply(b["contributions"]) * dirs[None]).sum(-1).cpu()  # [b, C]
        rows_i = torch.arange(start, start + len(p))[:, None].expand_as(p)
        v, i = torch.cat([best_v, p]), torch.cat([best_i, rows_i])
        best_v, keep = v.topk(min(n, len(v)), dim=0)
        best_i = i.gather(0, keep)
        start += len(p)
    return best_i.T.numpy(), best_v.T.numpy()


@torch.no_grad()
def mean_aligned_norms(rows: Rows, aligner: Aligner, batch_size: int = 256) -> np.ndarray:
    """Mean norm of each component's aligned contribution over the images ``[C]``."""
    total = torch.zeros(aligner.n_components)
    for b in rows.iter_batches(batch_size):
        total = total + aligner.apply(b["contributions"]).norm(dim=-1).sum(0).cpu()
    return (total / max(len(rows), 1)).numpy()


# ----------------------------------------------------------------------------------------------
# result


def confidence(
    rows: Rows, aligner: Aligner, feature_emb: Mapping[str, torch.Tensor], progress: bool = True
) -> dict[str, Any]:
    """Bootstrap intervals and a null for every score an analysis computes
    (:func:`vitdecomp.scores.analysis_scores`; see :func:`vitdecomp.scores.score_confidence`), JSON-ready
    per method."""
    methods = analysis_scores()
    conf = score_confidence(rows, aligner, feature_emb, methods, n_boot=N_BOOT, n_null=N_NULL, progress=progress)
    return {m: c.to_dict() for m, c in conf.items()}


def collect_result(
    *,
    models: Models,
    source: ImageSource,
    built: BuiltStore,
    aligned: AlignerStage,
    space: TextSpace,
    descriptions: Mapping[str, list[Description]],
    tables: Mapping[str, ScoreTable],
    norms: np.ndarray,
    top: tuple[np.ndarray, np.ndarray],
    errors: np.ndarray,
    cache_dir: Path,
    timings: dict[str, float],
    constant: Mapping[str, float] | None = None,
) -> AnalysisResult:
    """Every stage's output as one :class:`AnalysisResult` (the content of ``results.json``);
    ``constant`` components (rank-1 over the images) get no top images."""
    constant = dict(constant or {})
    subject, reader, al = models.subject, models.reader, aligned.aligner
    labels, (idx, vals) = built.store.labels, top
    metrics = {k: v for k, v in al.metrics.items() if k != "history"}
    return AnalysisResult(
        model=ModelInfo(subject.name, subject.weights_id, subject.is_clip),
        reader=ReaderInfo(reader.name, reader.weights_id),
        images=ImagesInfo(source.description, source.key, len(source), list(source.errors), source.root),
        start_layer=built.key.start_layer,
        labels=labels,
        features=space.features,
        vocabulary=VocabularyInfo(space.vocabulary_name, len(space.vocabulary), list(space.templates)),
        scores={m: t.to_dict() for m, t in tables.items()},
        rankings={m: {f: [lab for lab, _ in t.ranking(f)] for f in t.features} for m, t in tables.items()},
        descriptions={lab: [Pick(d.text, d.explained, d.projection) for d in ds] for lab, ds in descriptions.items()},
        mean_aligned_norm={lab: float(v) for lab, v in zip(labels, norms, strict=True)},
        top_images={
            lab: []
            if lab in constant
            else [TopImage(source.ids[j], float(v)) for j, v in zip(idx[c], vals[c], strict=True)]
            for c, lab in enumerate(labels)
        },
        completeness=Completeness(float(errors.max()), float(errors.mean()), float(np.median(errors))),
        alignment=Alignment(al.mode, al.lam, aligned.state, aligned.cosine_all_images, metrics),
        store=StoreInfo(str(built.store.path), built.key.to_dict(), built.key.digest()),
        aligner=AlignerInfo(None if aligned.path is None else str(aligned.path), al.key),
        cache=CacheInfo(str(cache_dir), built.rows_computed, built.rows_reused, aligned.state, space.encoder_batches),
        timings_s=timings,
        constant=constant,
        ranked_by=DEFAULT_SCORE,
    )
