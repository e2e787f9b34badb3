"""Who runs the models that fill a store: this process (the default,
:func:`vitdecomp.pipeline.fill.fill_in_process`) or a pool of Ray actors (``--runner ray``).

Both write the same store the same way, through its public write protocol
(:class:`vitdecomp.store.StoreWriter`): chunk ``k`` holds rows ``k R .. (k+1) R`` (``R`` =
``store.chunk_rows``). With Ray, the chunks the store does not list as committed (``missing_chunks``) become a Ray Data
dataset that ``map_batches`` sends, one chunk at a time, to an actor pool (``workers`` actors, each
with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs and its own copy of the models, shipped
once through the object store). An actor decodes its chunk's images, decomposes and embeds them and
writes the chunk's rows straight into the store; the driver commits each chunk as its result comes
back. A killed actor is restarted by Ray and its chunk redone: the rewrite lands on the same rows and
a chunk is committed once, so nothing is duplicated or lost; a killed driver leaves committed chunks
that the next run skips. Ray is optional: ``pip install 'vitdecomp[scale]'``.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.checks import require_ray
from vitdecomp.components import Decomposition
from vitdecomp.imageset import ImageSource
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.fill import FillOptions, model_fns
from vitdecomp.pipeline.model_pair import Models
from vitdecomp.store import StoreWriter

#: Fault injection for the tests: ``VITDECOMP_KILL_ONCE=<point>=<marker file>`` kills the process
#: that reaches ``point`` with SIGKILL, once (the marker file records that it happened).
KILL_ONCE_ENV = "VITDECOMP_KILL_ONCE"


@dataclass(frozen=True)
class RayRunner:
    """Fill a store with a pool of Ray actors (a :data:`vitdecomp.pipeline.fill.StoreFiller`).

    ``address``: the cluster to join (``None``: the one this process already joined, else a local
    one started for the run); ``workers`` actors of ``cpus_per_worker`` CPUs and ``gpus_per_worker``
    GPUs (on a GPU when > 0); ``threads``: torch threads per actor (default: its CPUs).
    """

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int | None = None

    def __call__(
        self,
        store: StoreWriter,
        models: Models,
        source: ImageSource,
        options: FillOptions,
    ) -> None:
        ray = require_ray()
        n, progress = len(source), options.progress
        store.allocate(n, *_dims(models, source, options.start_layer, options.device))
        r = store.chunk_rows
        todo = store.missing_chunks(n)
        if not todo:
            return
        store.close()  # the job carries the store's handle to the actors, without open arrays
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=progress)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            job = ray.put(  # held here for the whole run: a restarted actor reads it again
                _ChunkJob(
                    models=models,
                    source=source,
                    store=store,
                    start_layer=options.start_layer,
                    batch_size=options.batch_size,
                    device="cuda" if self.gpus_per_worker > 0 else "cpu",
                    threads=self.threads or max(1, int(self.cpus_per_worker)),
                )
            )
            ds = self.actor_pool(ray, todo, _ChunkWriter, job)
            with tqdm(
                total=n,
                initial=n - sum(min(r, n - k * r) for k in todo),
                desc="decompose + CLIP (ray)",
                unit="img",
                disable=not progress,
            ) as bar:
                for row in ds.iter_rows():
                    store.commit({int(row["chunk"]): int(row["rows"])})
                    bar.update(int(row["rows"]))
        finally:
            if started:
                ray.shutdown()

    def actor_pool(self, ray: Any, chunks: list[int], actor: type, job: Any) -> Any:
        """A Ray Data dataset of ``chunks`` mapped, one chunk per call, by a pool of ``actor(job=job)``."""
        return ray.data.from_items([{"chunk": k} for k in chunks], override_num_blocks=len(chunks)).map_batches(
            actor,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            concurrency=self.workers,
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
        )

    def decompose(self, loaded: LoadedModel, source: ImageSource, chunk_rows: int, **options: Any) -> Decomposition:
        """``vitdecomp decompose --runner ray``: the decomposition of every image of ``source``
        (``options`` go to :func:`vitdecomp.decompose`; no token splits), computed by the actor pool
        ``chunk_rows`` images per call and gathered here in row order."""
        ray = require_ray()
        first = decompose(loaded, torch.stack([loaded.preprocess(source.image(0))]), **options)  # fails early
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            device = "cuda" if self.gpus_per_worker > 0 else "cpu"
            threads = self.threads or max(1, int(self.cpus_per_worker))
            job = ray.put(_DecomposeJob(loaded, source, chunk_rows, device, threads, options))
            chunks = list(range(math.ceil(len(source) / chunk_rows)))
            parts = {
                int(b["chunk"][0]): b for b in self.actor_pool(ray, chunks, _Decomposer, job).iter_batches(batch_size=1)
            }
        finally:
            if started:
                ray.shutdown()
        stack = {name: torch.from_numpy(np.concatenate([parts[k][name][0] for k in chunks])) for name in ("c", "z")}
        return Decomposition(stack["c"], first.labels, stack["z"], meta=first.meta)


def _dims(models: Models, source: ImageSource, start_layer: int, device: str) -> tuple[int, int]:
    """``(D, d_clip)``: the contributions' and the reader embedding's widths, from the first image."""
    decompose_fn, embed_fn = model_fns(models, start_layer, device)
    with torch.no_grad():
        first = [source.image(0)]
        return int(decompose_fn(first).contributions.shape[-1]), int(embed_fn(first).shape[-1])


@dataclass
class _ChunkJob:
    """What every actor needs: the models, the image source, the store and how to run."""

    models: Models
    source: ImageSource
    store: StoreWriter
    start_layer: int
    batch_size: int
    device: str
    threads: int


class _ChunkWriter:
    """A Ray actor: its own models; each call decomposes whole chunks and writes their rows."""

    def __init__(self, job: Any) -> None:
        import ray

        self.job: _ChunkJob = ray.get(job) if isinstance(job, ray.ObjectRef) else job
        torch.set_num_threads(self.job.threads)
        self.job.models.subject.to(self.job.device)
        self.job.models.reader.to(self.job.device)
        self.fns = model_fns(self.job.models, self.job.start_layer, self.job.device)
        self.store = self.job.store.reopen()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = [int(k) for k in batch["chunk"]]
        return {"chunk": np.asarray(chunks), "rows": np.asarray([self.write(k) for k in chunks])}

    @torch.no_grad()
    def write(self, k: int) -> int:
        """Decompose, embed and write the rows of chunk ``k``; how many rows it has."""
        job, (decompose_fn, embed_fn) = self.job, self.fns
        r, n = self.store.chunk_rows, len(job.source)
        start, stop = k * r, min(n, (k + 1) * r)
        parts = []
        for s in range(start, stop, job.batch_size):
            images = [job.source.image(i) for i in range(s, min(stop, s + job.batch_size))]
            dec = decompose_fn(images)
            parts.append((dec.contributions.cpu(), dec.representation.cpu(), embed_fn(images).cpu()))
        c, z, e = (torch.cat(x) for x in zip(*parts, strict=True))
        self.store.write_rows(start, job.source.ids[start:stop], c, z, e)
        kill_once(f"ray-chunk-written:{k}")
        return stop - start


@dataclass
class _DecomposeJob:
    loaded: LoadedModel
    source: ImageSource
    chunk_rows: int
    device: str
    threads: int
    options: dict[str, Any]


class _Decomposer:
    """A Ray actor for ``vitdecomp decompose``: its own model; returns each chunk's decomposition."""

    def __init__(self, job: Any) -> None:
        import ray

        self.job: _DecomposeJob = ray.get(job) if isinstance(job, ray.ObjectRef) else job
        torch.set_num_threads(self.job.threads)
        self.job.loaded.to(self.job.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job, (k,) = self.job, [int(k) for k in batch["chunk"]]
        rows = range(k * job.chunk_rows, min(len(job.source), (k + 1) * job.chunk_rows))
        x = torch.stack([job.loaded.preprocess(job.source.image(i)) for i in rows]).to(job.device)
        d = decompose(job.loaded, x, **job.options)
        return {
            "chunk": np.asarray([k]),
            "c": d.contributions.cpu().numpy()[None],
            "z": d.representation.cpu().numpy()[None],
        }


def kill_once(point: str) -> None:
    """Die here with SIGKILL when ``$VITDECOMP_KILL_ONCE`` names this point and its marker file does
    not exist yet (it is created first, so the retried work goes through)."""
    spec = os.environ.get(KILL_ONCE_ENV, "")
    name, _, marker = spec.partition("=")
    if name == point and marker and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
