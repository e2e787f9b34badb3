"""``vitdecomp decompose``: decompose a model's representation of an image set, print a summary
and, with ``--out``, save every image's contributions (and token splits) with their labels."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from vitdecomp.api import decompose
from vitdecomp.components import Decomposition
from vitdecomp.errors import NonFiniteInputError, UsageError
from vitdecomp.imageset import ImageSource, folder_source, skip_report, world_source
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.pipeline.stages import load_model_for


def decompose_images(args: argparse.Namespace) -> int:
    """Run ``decompose`` for parsed arguments (checked by :func:`vitdecomp.pipeline.cli.check_decompose_args`)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model_for(args.model, args.checkpoint, args.random_init, device, args.seed)
    if args.images:
        source = folder_source(args.images, args.n_images, skip_bad=args.skip_bad_images, progress=not args.quiet)
        if not len(source):
            raise UsageError(f"--images {args.images}: no readable image ({len(source.errors)} skipped)")
        if skip_report(source):
            print(f"vitdecomp: {skip_report(source)}", file=sys.stderr)
    else:
        source = world_source(args.n_images or 8, seed=0)
    if args.runner == "ray":
        from vitdecomp.pipeline.runners import RayRunner

        runner = RayRunner(args.address, args.workers, args.cpus_per_worker, args.gpus_per_worker)
        try:
            whole = runner.decompose(
                loaded, source, args.batch_size, start_layer=args.start_layer, representation=args.representation
            )
        except ValueError as err:
            if str(err).startswith("start_layer"):
                raise UsageError(f"--start-layer {args.start_layer}: {err}") from err
            raise
    else:
        whole = _decompose_here(args, loaded, source, device)
    meta = {
        "model": loaded.name,
        "weights_id": loaded.weights_id,
        "start_layer": args.start_layer,
        "representation": args.representation or "default",
        "images": source.description,
    }
    if args.out:
        whole.save(args.out, ids=source.ids, meta=meta)
    _print_summary(whole, loaded.name, loaded.weights_id, args.top, args.out, quiet=args.quiet)
    return 0


def _decompose_here(args: argparse.Namespace, loaded: LoadedModel, source: ImageSource, device: str) -> Decomposition:
    """Every image of ``source`` decomposed in this process, batch by batch (a folder's images decoded
    by a ``DataLoader`` with workers)."""
    parts: list[Decomposition] = []
    with tqdm(total=len(source), unit="img", desc="decompose", disable=args.quiet) as bar:
        for ids, images in source.batches(args.batch_size)(0):
            x = torch.stack([loaded.preprocess(im) for im in images]).to(device)
            try:
                d = decompose(
                    loaded, x, tokens=args.tokens, start_layer=args.start_layer, representation=args.representation
                )
            except NonFiniteInputError as err:
                raise NonFiniteInputError.of([ids[i] for i in err.positions] or err.names) from err
            except ValueError as err:
                if str(err).startswith("start_layer"):
                    raise UsageError(f"--start-layer {args.start_layer}: {err}") from err
                raise
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


def _print_summary(d: Decomposition, name: str, weights_id: str, top: int, out: str | None, quiet: bool) -> None:
    n = d.contributions.shape[0]
    if quiet:
        if out:
            print(out)
        return
    print(f"{name} ({weights_id}) on {n} images")
    print(d.summary())
    norms = d.contributions.float().norm(dim=-1).mean(0)
    print(f"largest components (mean L2 norm over {n} images):")
    for i in torch.argsort(norms, descending=True)[:top].tolist():
        print(f"  {d.names[i]:24s} {norms[i].item():10.4f}")
    if out:
        print(f"saved: {out}/decomposition.safetensors (+ labels.json)", file=sys.stdout)
