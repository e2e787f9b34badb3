"""``vitdecomp decompose`` as a function: every image of a set decomposed by one model, batch by batch
in this process or by a Ray actor pool (:func:`decompose_images`), with its typed options
(:class:`~vitdecomp.pipeline.config.DecomposeConfig`). In this process each batch is summarised and,
with ``--out``, written to the file at its rows (:class:`~vitdecomp.savefile.RowsFile`) before the next:
memory does not grow with the number of images."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.checks import default_device
from vitdecomp.components import Decomposition, SetSummary
from vitdecomp.errors import NonFiniteInputError, UsageError
from vitdecomp.imageset import ImageSource, folder_source, skip_report, world_source
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.config import N_WORLD_IMAGES, DecomposeConfig
from vitdecomp.pipeline.model_pair import load_model_for
from vitdecomp.savefile import RowsFile


@dataclass
class DecomposedSet:
    """What ``vitdecomp decompose`` prints about every image's decomposition (``summary``), the model
    that made it, the image set and what ``labels.json`` records about them (``meta``); the
    decomposition itself is in ``cfg.out`` when one was given."""

    summary: SetSummary
    loaded: LoadedModel
    source: ImageSource
    meta: dict[str, object]


def decompose_images(cfg: DecomposeConfig) -> DecomposedSet:
    """Run ``decompose`` for ``cfg`` (checked by :meth:`DecomposeConfig.check`), writing
    ``cfg.out/decomposition.safetensors`` + ``labels.json`` when ``cfg.out`` is set."""
    device = default_device(cfg.device)
    source = _source(cfg)  # every file read before the model loads
    loaded = load_model_for(cfg.model, cfg.checkpoint, cfg.random_init, device, cfg.seed)
    meta: dict[str, object] = {
        "model": loaded.name,
        "weights_id": loaded.weights_id,
        "start_layer": cfg.start_layer,
        "representation": cfg.representation or "default",
        "images": source.description,
    }
    try:
        if cfg.runner == "ray":
            whole = _decompose_by_ray(cfg, loaded, source)
            if cfg.out:
                whole.save(cfg.out, ids=source.ids, meta=meta)
            summary = SetSummary().add(whole)
        else:
            summary = _decompose_here(cfg, loaded, source, device, meta)
    except ValueError as err:
        if str(err).startswith("start_layer"):
            raise UsageError(f"--start-layer {cfg.start_layer}: {err}") from err
        raise
    return DecomposedSet(summary, loaded, source, meta)


def _source(cfg: DecomposeConfig) -> ImageSource:
    if not cfg.images:
        return world_source(cfg.n_images or N_WORLD_IMAGES, seed=0)
    source = folder_source(cfg.images, cfg.n_images, skip_bad=cfg.skip_bad_images, progress=cfg.progress)
    if not len(source):
        raise UsageError(f"--images {cfg.images}: no readable image ({len(source.errors)} skipped)")
    if skip_report(source):
        print(f"vitdecomp: {skip_report(source)}", file=sys.stderr)
    return source


def _decompose_by_ray(cfg: DecomposeConfig, loaded: LoadedModel, source: ImageSource) -> Decomposition:
    from vitdecomp.pipeline.ray_fill import RayRunner

    runner = RayRunner(cfg.address, cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)
    return runner.decompose(
        loaded, source, cfg.batch_size, start_layer=cfg.start_layer, representation=cfg.representation
    )


def _decompose_here(
    cfg: DecomposeConfig, loaded: LoadedModel, source: ImageSource, device: str, meta: dict[str, object]
) -> SetSummary:
    """Every image of ``source`` decomposed in this process, batch by batch (a folder's images decoded
    by a ``DataLoader`` with workers), each batch summarised and written (``cfg.out``) in turn."""
    summary = SetSummary()
    out = RowsFile(cfg.out, len(source)) if cfg.out else None
    with (
        contextlib.ExitStack() as stack,
        tqdm(total=len(source), unit="img", desc="decompose", disable=not cfg.progress) as bar,
    ):
        if out is not None:
            stack.enter_context(out)  # moved into place when every row is written, removed on an error
        for ids, images in source.batches(cfg.batch_size)(0):
            x = torch.stack([loaded.preprocess(im) for im in images]).to(device)
            try:
                d = decompose(
                    loaded, x, tokens=cfg.tokens, start_layer=cfg.start_layer, representation=cfg.representation
                )
            except NonFiniteInputError as err:
                raise NonFiniteInputError.of([ids[i] for i in err.positions] or err.names) from err
            summary.add(d)
            if out is not None:
                out.write(d.file_arrays(), d.file_description(source.ids, meta))
            bar.update(len(ids))
    return summary
