"""Where an attribute's counterfactual change flows, by part and by place: is the zoo's shape local?

The world renders each scene twice, identical but for one attribute (``make_scenes(n, seed,
fixed={attr: other})``; for shape, colour and pattern the two images are identical outside the two
objects, checked here pixel by pixel). Both are decomposed with every head split over its source
tokens; with ``dr = r(x') - r(x)`` (exact: the parts sum to it), a part's **flow** is
``sum <dc_part, dr> / sum ||dr||^2`` over the pairs: the share of the attribute's change that travels
through it (the flows of all parts add up to 1). Head flows are split by where their source token
sits: inside the object (its pixel box lies within both images' objects), on its edge (the box
overlaps either object without lying inside both), off it, or a prefix token (class token: no place).
A map over tokens can localise only the head flow that enters through object tokens.

    python benchmarks/shape_locality.py --models zoo:deit zoo:swin zoo:maxvit zoo:clip zoo:simclr zoo:planted \
        --n 200 --seed 7500
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from vitdecomp.api import decompose
from vitdecomp.models.loading import load_model
from vitdecomp.world import ATTRIBUTES, make_scenes

ATTRS = ("shape", "color", "pattern")


def pairs(n: int, seed: int, attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scenes, their counterfactual twins (``attr`` changed to another value), the union and the
    intersection of the two object masks ``[n, H, W]``; refuses a pair that differs outside the objects."""
    a = make_scenes(n, seed=seed)
    v = len(ATTRIBUTES[attr])
    other = (a.labels(attr) + np.random.default_rng(seed).integers(1, v, size=n)) % v
    b = make_scenes(n, seed=seed, fixed={attr: other})
    union = a.masks | b.masks
    if (a.images != b.images)[~union].any():
        raise RuntimeError(f"{attr} pairs differ outside the objects")
    return a.images, b.images, union, a.masks & b.masks


def _places(boxes: torch.Tensor, union: torch.Tensor, both: torch.Tensor) -> torch.Tensor:
    """Per image and token ``[B, N]``: 0 prefix (no box), 1 inside both objects, 2 on an edge, 3 off."""
    out = torch.full((union.shape[0], len(boxes)), 3, dtype=torch.long)
    for t, (top, left, bottom, right) in enumerate(boxes.long().tolist()):
        if top < 0:
            out[:, t] = 0
            continue
        inside = both[:, top:bottom, left:right].flatten(1).all(1)
        touch = union[:, top:bottom, left:right].flatten(1).any(1)
        out[:, t] = torch.where(inside, 1, torch.where(touch, 2, 3))
    return out


def flows(model, x: torch.Tensor, y: torch.Tensor, union: torch.Tensor, both: torch.Tensor) -> tuple[dict, float]:
    """Unnormalised flows ``sum <dc, dr>`` per (layer, where) for one batch and ``sum ||dr||^2``."""
    with torch.no_grad():
        dx, dy = decompose(model, x, heads=True), decompose(model, y, heads=True)
        dr = (dy.representation - dx.representation).double()  # [B, D]
        tx = decompose(model, x, token_directions=dr.float())
        ty = decompose(model, y, token_directions=dr.float())
    out: dict = defaultdict(float)
    rows = torch.arange(len(x))
    for lab, cx, cy in zip(dx.labels, dx.contributions.unbind(1), dy.contributions.unbind(1), strict=True):
        if lab.head is None:
            where = "mlp" if "mlp" in lab.kind else "other"
            out[(lab.layer, where)] += float(((cy - cx).double() * dr).sum())
    names = {"prefix": 0, "inside": 1, "edge": 2, "off": 3}
    for sx, sy in zip(tx.tokens, ty.tokens, strict=True):
        place = _places(sx.pixel_boxes, union, both)  # [B, N]
        change = (sy.values - sx.values)[rows, :, :, rows].double()  # [B, H, N]: <dc_{h,n}, dr_b>
        for h, lab in enumerate(sx.labels):
            for name, code in names.items():
                out[(lab.layer, name)] += float((change[:, h] * (place == code)).sum())
    return out, float(dr.square().sum())


def run(name: str, attr: str, n: int, seed: int, batch: int = 25) -> dict:
    model = load_model(name)
    a, b, union, both = pairs(n, seed, attr)
    total: dict = defaultdict(float)
    norm = 0.0
    for s in range(0, n, batch):
        idx = range(s, min(s + batch, n))
        x = torch.stack([model.preprocess(_pil(a[i])) for i in idx])
        y = torch.stack([model.preprocess(_pil(b[i])) for i in idx])
        f, z = flows(model, x, y, torch.from_numpy(union[list(idx)]), torch.from_numpy(both[list(idx)]))
        for k, v in f.items():
            total[k] += v
        norm += z
    return {k: v / norm for k, v in total.items()}


def _pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["zoo:deit"])
    p.add_argument("--attrs", nargs="+", default=list(ATTRS))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=7500)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        "| model | attribute | heads: inside the object | heads: its edge | heads: off it | heads: prefix | MLPs "
        "| other | heads' object flow (inside + edge) by layer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for attr in args.attrs:
            f = run(name, attr, args.n, args.seed)
            by = defaultdict(float)
            for (_layer, where), v in f.items():
                by[where] += v
            layers = sorted({k[0] for k in f if k[0] is not None})
            per_layer = " / ".join(f"{f.get((lay, 'inside'), 0.0) + f.get((lay, 'edge'), 0.0):+.2f}" for lay in layers)
            cells = [by[w] for w in ("inside", "edge", "off", "prefix", "mlp", "other")]
            print(f"| {name} | {attr} | " + " | ".join(f"{c:+.2f}" for c in cells) + f" | {per_layer} |", flush=True)


if __name__ == "__main__":
    main()
