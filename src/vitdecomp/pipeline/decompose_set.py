"""``vitdecomp decompose`` as a function: every image of a set decomposed by one model, batch by batch
in this process or by a Ray actor pool (:func:`decompose_images`), with its typed options
(:class:`~vitdecomp.pipeline.config.DecomposeConfig`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.checks import default_device
from vitdecomp.components import Decomposition
from vitdecomp.errors import NonFiniteInputError, UsageError
from vitdecomp.imageset import ImageSource, folder_source, skip_report, world_source
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.config import N_WORLD_IMAGES, DecomposeConfig
from vitdecomp.pipeline.model_pair import load_model_for


@dataclass
class DecomposedSet:
    """The decomposition of every image, the model that made it, the image set and what ``labels.json``
    records about them (``meta``)."""

    decomposition: Decomposition
    loaded: LoadedModel
    source: ImageSource
    meta: dict[str, object]


def decompose_images(cfg: DecomposeConfig) -> DecomposedSet:
    """Run ``decompose`` for ``cfg`` (checked by :meth:`DecomposeConfig.check`)."""
    device = default_device(cfg.device)
    source = _source(cfg)  # every file read before the model loads
    loaded = load_model_for(cfg.model, cfg.checkpoint, cfg.random_init, device, cfg.seed)
    try:
        if cfg.runner == "ray":
            whole = _decompose_by_ray(cfg, loaded, source)
        else:
            whole = _decompose_here(cfg, loaded, source, device)
    except ValueError as err:
        if str(err).startswith("start_layer"):
            raise UsageError(f"--start-layer {cfg.start_layer}: {err}") from err
        raise
    meta = {
        "model": loaded.name,
        "weights_id": loaded.weights_id,
        "start_layer": cfg.start_layer,
        "representation": cfg.representation or "default",
        "images": source.description,
    }
    return DecomposedSet(whole, loaded, source, meta)


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


def _decompose_here(cfg: DecomposeConfig, loaded: LoadedModel, source: ImageSource, device: str) -> Decomposition:
    """Every image of ``source`` decomposed in this process, batch by batch (a folder's images decoded
    by a ``DataLoader`` with workers)."""
    parts: list[Decomposition] = []
    with tqdm(total=len(source), unit="img", desc="decompose", disable=not cfg.progress) as bar:
        for ids, images in source.batches(cfg.batch_size)(0):
            x = torch.stack([loaded.preprocess(im) for im in images]).to(device)
            try:
                d = decompose(
                    loaded, x, tokens=cfg.tokens, start_layer=cfg.start_layer, representation=cfg.representation
                )
            except NonFiniteInputError as err:
                raise NonFiniteInputError.of([ids[i] for i in err.positions] or err.names) from err
            parts.append(_to_cpu(d))
            bar.update(len(ids))
    return _concat(parts)


def _to_cpu(d: Decomposition) -> Decomposition:
    d.contributions, d.representation = d.contributions.cpu(), d.representation.cpu()
    for tok in d.tokens:
        tok.values = tok.values.cpu()
    return d


def _concat(parts: list[Decomposition]) -> Decomposition:
    """One decomposition of every image (batches concatenated along the image axis)."""
    first = parts[0]
    tokens = []
    for i, tok in enumerate(first.tokens):
        values = torch.cat([p.tokens[i].values for p in parts])
        tokens.append(type(tok)(values, tok.labels, tok.pixel_boxes, tok.grid_size, tok.num_prefix_tokens))
    return Decomposition(
        contributions=torch.cat([p.contributions for p in parts]),
        labels=first.labels,
        representation=torch.cat([p.representation for p in parts]),
        tokens=tokens,
        meta=first.meta,
    )
