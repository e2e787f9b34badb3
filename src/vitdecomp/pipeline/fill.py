"""The store stage: the keyed store of the subject's decompositions and the reader's image
embeddings of an image set, filled where rows are missing (:func:`build_store`).

The store (:mod:`vitdecomp.store`) only writes and reads rows; the models run here. Who fills it is a
:data:`StoreFiller`: this process (:func:`fill_in_process`, which appends through the store's public
write protocol) or a pool of Ray actors (:class:`vitdecomp.pipeline.ray_fill.RayRunner`). A small
store is then read into memory once (:func:`readable_rows`), a large one streamed chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.components import Decomposition
from vitdecomp.defaults import BATCH_SIZE
from vitdecomp.errors import MismatchError, NonFiniteInputError, UsageError
from vitdecomp.imageset import ImageSource
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.pipeline.model_pair import Models
from vitdecomp.progress import postfix_writer
from vitdecomp.store import Rows, StoreKey, StoreLock, StoreWriter, open_store, store_dir

#: Stores smaller than this (as float32) are read into memory for training, descriptions and scores;
#: larger ones are streamed.
IN_MEMORY_BYTES = 1 << 30


#: One batch from an image source: ``(image ids, images)``; ``images`` is whatever the callables take.
Batch = tuple[Sequence[str], Any]


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
    store: StoreWriter,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    decompose_fn: Callable[[Any], Decomposition],
    embed_fn: Callable[[Any], torch.Tensor],
    *,
    total: int | None = None,
    progress: bool = True,
    blocks: Sequence[torch.nn.Module] = (),
    reader_beside: bool = False,
) -> StoreWriter:
    """Decompose and embed every image of ``batches`` into ``store``, resuming where it stopped.

    ``batches`` yields ``(ids, images)``; ``images`` goes unchanged to ``decompose_fn(images) ->
    Decomposition`` (``contributions [B, C, D]``) and ``embed_fn(images) -> [B, d_clip]`` (the
    reader's image embedding), so each does its own preprocessing. Rows already committed are
    skipped (their ids must match, otherwise :class:`MismatchError`); pass a callable
    ``batches(start)`` to let the source skip reading them. Rows are held until they complete the
    store's current chunk (at most one chunk in memory), then written and committed together: an
    interruption loses at most the chunk under way. ``total`` sizes the progress bar; ``blocks``
    (the subject's, :func:`repeated_blocks`) make it say which block a batch is in while a batch runs
    (a base-size model takes a minute a batch on a CPU); ``reader_beside``: ``embed_fn`` runs in a
    second thread beside ``decompose_fn`` (:func:`reader_has_a_core`).
    """
    done = store.committed
    stored_ids = store.ids
    source = batches(done) if callable(batches) else batches
    position = done if callable(batches) else 0
    pending = _PendingRows()
    bar = tqdm(total=total, initial=done, desc="decompose + CLIP", unit="img", disable=not progress)
    hooks = _block_progress(blocks, bar) if progress else []
    beside = ThreadPoolExecutor(1, thread_name_prefix="reader") if reader_beside else None
    try:
        for ids, images in source:
            ids = [str(i) for i in ids]
            b = len(ids)
            skip = min(max(done - position, 0), b)
            _check_stored(ids[:skip], stored_ids, position)
            position += b
            if skip == b:
                continue
            if skip:
                images, ids = images[skip:], ids[skip:]
            embedded = _embedding(embed_fn, images, beside)
            dec, emb = _decomposed(decompose_fn, images, ids), embedded()
            if not store.shapes:  # the first rows fix the arrays' dims and the chunk size
                store.allocate(0, int(dec.contributions.shape[-1]), int(emb.shape[-1]), expected_rows=total)
            pending.add(ids, dec, emb)
            if pending.completes_chunk(store):
                bar.update(pending.flush(store))
        bar.update(pending.flush(store))
    finally:
        for h in hooks:
            h.remove()
        if beside is not None:
            beside.shutdown(wait=True, cancel_futures=True)
        bar.close()
        store.close()
    return store


@torch.no_grad()
def _decomposed(decompose_fn: Callable[[Any], Decomposition], images: Any, ids: list[str]) -> Decomposition:
    """``decompose_fn(images)``; non-finite inputs are named by their image ids."""
    try:
        return decompose_fn(images)
    except NonFiniteInputError as err:
        raise NonFiniteInputError.of([ids[i] for i in err.positions] or err.names) from err


def _embedding(
    embed_fn: Callable[[Any], torch.Tensor], images: Any, beside: ThreadPoolExecutor | None
) -> Callable[[], torch.Tensor]:
    """The reader's embedding of ``images`` ``[B, d_clip]`` (no gradients), started in ``beside``'s
    thread when given (it runs while the subject decomposes), else computed when asked for."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return embed_fn(images)

    return run if beside is None else beside.submit(run).result


def _shared(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models share a module (a subject that reads itself): the decomposition's hooks on one
    would see the other's forward, so they must not run side by side."""
    return not {id(m) for m in a.modules()}.isdisjoint(id(m) for m in b.modules())


def reader_has_a_core() -> bool:
    """Whether the reader can run beside the subject on a core of its own: both models on one thread
    each (``--threads 1``, the zoo's default) and at least two cores. On the 2-core machine the default
    analysis' store stage then takes 0.73x the time (the zoo CLIP's embedding, ~60 % of the subject's
    decomposition, runs beside it)."""
    return 2 * torch.get_num_threads() <= (os.cpu_count() or 1)


def _check_stored(ids: list[str], stored_ids: list[str], position: int) -> None:
    """Rows already committed from ``position`` on must have the ``ids`` the source gives them."""
    if ids and ids != stored_ids[position : position + len(ids)]:
        raise MismatchError(
            f"image ids {ids[:3]} differ from the store's rows {position}..{position + len(ids)} "
            f"({stored_ids[position : position + len(ids)][:3]}): the image source changed since the "
            "store was written"
        )


def repeated_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's blocks, for a progress bar: the longest ``ModuleList`` / ``Sequential`` of modules of
    one class (timm's ``blocks``; a hierarchical model's longest stage)."""
    best: list[torch.nn.Module] = []
    for m in net.modules():
        repeated = isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len({type(c) for c in m}) == 1
        if repeated and len(m) > len(best):
            best = list(m)
    return best


def _block_progress(blocks: Sequence[torch.nn.Module], bar: tqdm) -> list[Any]:
    """Forward hooks on ``blocks`` that write ``block i/n`` after the fill bar
    (:func:`~vitdecomp.progress.postfix_writer`); the hooks' handles, to remove."""
    say = postfix_writer(bar)
    return [b.register_forward_hook(lambda *_, i=i: say(f"block {i + 1}/{len(blocks)}")) for i, b in enumerate(blocks)]


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

    def completes_chunk(self, store: StoreWriter) -> bool:
        """The held rows reach the end of the chunk that the store's next row falls in."""
        r = store.chunk_rows
        return store.committed + len(self.ids) >= (store.committed // r + 1) * r

    def flush(self, store: StoreWriter) -> int:
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

    store: StoreWriter
    key: StoreKey
    rows_computed: int

    @property
    def rows_reused(self) -> int:
        return self.store.committed - self.rows_computed


@dataclass(frozen=True)
class FillOptions:
    """How a store is filled: the decomposition's ``start_layer``, images per batch, the device the
    models run on, progress bars."""

    start_layer: int = 0
    batch_size: int = BATCH_SIZE
    device: str = "cpu"
    progress: bool = True


#: Fills an opened store with the models' rows of an image set: ``fill(store, models, source,
#: options)``; :func:`fill_in_process` by default, Ray actors with
#: :class:`vitdecomp.pipeline.ray_fill.RayRunner`.
StoreFiller = Callable[[StoreWriter, Models, ImageSource, FillOptions], None]


def build_store(
    models: Models,
    source: ImageSource,
    root: str | Path,
    options: FillOptions | None = None,
    *,
    dtype: str = "float32",
    fill: StoreFiller | None = None,
    chunk_rows: int | None = None,
) -> BuiltStore:
    """Open (or resume) the keyed store under ``root`` (a folder or an fsspec URL) of the subject's
    decompositions and the reader's image embeddings of ``source`` and fill it with ``fill``
    (default: in this process) as ``options`` say; each model preprocesses the images its own way.
    The models run here: the store only writes and reads rows. ``dtype``: the contributions' storage
    type; ``chunk_rows``: rows per chunk of a new store."""
    options = options or FillOptions()
    key = store_key(models, source, options.start_layer, options.device)
    with StoreLock(store_dir(root, key, dtype)):
        store = open_store(root, key, dtype=dtype, chunk_rows=chunk_rows)
        before = store.committed
        (fill or fill_in_process)(store, models, source, options)
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


def fill_in_process(store: StoreWriter, models: Models, source: ImageSource, options: FillOptions) -> None:
    """:func:`fill_store` in this process with the subject's decompositions and the reader's
    embeddings (a folder's images decoded by a ``DataLoader`` with workers, see :mod:`vitdecomp.imageset`)."""
    decompose_fn, embed_fn = model_fns(models, options.start_layer, options.device)
    batches = source.batches(options.batch_size)
    blocks = repeated_blocks(models.subject.model)
    fill_store(
        store,
        batches,
        decompose_fn,
        embed_fn,
        total=len(source),
        progress=options.progress,
        blocks=blocks,
        reader_beside=reader_has_a_core() and not _shared(models.subject.model, models.reader.model),
    )


def readable_rows(store: StoreWriter, max_bytes: int = IN_MEMORY_BYTES) -> Rows:
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


def configured_store(
    cfg: AnalysisConfig, models: Models, source: ImageSource, device: str, fill: StoreFiller | None = None
) -> BuiltStore:
    """The cached store of ``source`` under ``cfg``'s cache, filled where rows are missing (``fill``:
    who fills it; ``None``: this process)."""
    options = FillOptions(cfg.start_layer, cfg.batch_size, device, cfg.progress)
    return build_store(models, source, cfg.cache_path / "stores", options, dtype=cfg.dtype, fill=fill)
