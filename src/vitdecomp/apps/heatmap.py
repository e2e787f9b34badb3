"""``vitdecomp heatmap``: where in each image the chosen heads write along a text direction.

For each image: the chosen heads' per-token contributions, aligned into CLIP space and projected on
the text's embedding (:func:`vitdecomp.apps.token_maps.token_maps`), placed on each token's pixels
in the model's input and mapped back onto the original image through the model's own resize / crop.
``--feature F`` without ``--text`` uses, per image, the text of F's value that the aligned whole
representation matches best (the model's own zero-shot reading, no labels). ``--heads auto``: the
top heads for the feature (:func:`vitdecomp.apps.analysis.auto_heads`; with ``--text`` alone, the
feature whose value texts come closest to the text). When a feature is known (``--feature`` or
``--heads auto``) the map reads the text's direction minus the mean of the feature's other values'
texts (:func:`contrastive`); with ``--text`` and named heads, the text's own direction.

Writes per image ``<name>.png`` (the image with the map over it: red positive, blue negative, a
symmetric scale; captioned with the text and the heads) and ``<name>.npy`` (the map ``[H, W]`` in
the original image's pixels), and ``heatmaps.json`` (what was used).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitdecomp.apps.analysis import Analysis, auto_heads, load_analysis
from vitdecomp.apps.pixels import input_geometry
from vitdecomp.apps.token_maps import TokenMaps, token_maps
from vitdecomp.errors import VitDecompError


@dataclass
class Heatmap:
    """One image's map: ``original [H0, W0]`` (original pixels), ``input [H, W]`` (model input pixels),
    the text it reads and the heads summed."""

    original: np.ndarray
    input: np.ndarray
    text: str
    heads: list[str]


def whole_reading(maps: TokenMaps, analysis: Analysis, value_emb: torch.Tensor) -> torch.Tensor:
    """``[B]``: per image, the value (row of ``value_emb [V, d_clip]``) the aligned whole representation
    is closest to."""
    d = maps.decomposition
    whole = d.representation if analysis.aligner is None else analysis.aligner.apply_sum(d.contributions)
    return (torch.nn.functional.normalize(whole.float().cpu(), dim=-1) @ value_emb.float().cpu().T).argmax(-1)


def contrastive(emb: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[k, d]``: each text of ``emb [k, d]`` minus the mean of its feature's value texts ``values
    [V, d]`` other than the one closest to it: what tells the value apart from the feature's other
    values, without what every value's text shares ("an object", "a photo")."""
    unit = torch.nn.functional.normalize
    closest = (unit(emb.float(), dim=-1) @ unit(values.float(), dim=-1).T).argmax(-1)  # [k], by cosine
    others = (values.float().sum(0, keepdim=True) - values.float()[closest]) / max(1, len(values) - 1)
    return emb.float() - others


def heatmaps(
    analysis: Analysis,
    images: list[Image.Image],
    *,
    text: str | None = None,
    feature: str | None = None,
    heads: list[str] | str = "auto",
) -> list[Heatmap]:
    """Maps of ``images`` along ``text`` (or, per image, the best-matching value of ``feature``)."""
    if text is None and feature is None:
        raise VitDecompError("give a text (--text) or a feature (--feature)")
    texts = [text] if text is not None else list(analysis.result.features[feature])
    emb = analysis.embed(texts)  # [k, d_clip]
    if heads == "auto":
        feature = feature or analysis.feature_of(emb[0])
        heads = auto_heads(analysis.scores(feature), analysis.result.labels)
    dirs = emb if feature is None else contrastive(emb, analysis.embed(list(analysis.result.features[feature])))
    subject = analysis.subject
    x = torch.stack([subject.preprocess(im.convert("RGB")) for im in images])
    x = x.to(next(subject.model.parameters(), x).device)
    maps = token_maps(subject, x, dirs, aligner=analysis.aligner, start_layer=analysis.result.start_layer or 0)
    px = maps.pixels(heads).float().cpu()  # [B, k, H, W]
    pick = torch.zeros(len(images), dtype=torch.long) if text is not None else whole_reading(maps, analysis, emb)
    pick = pick.cpu()
    out = []
    for i, im in enumerate(images):
        m = px[i, pick[i]]
        geo = input_geometry(subject.preprocess, (im.height, im.width))
        back = geo.to_original(m[None])[0]
        out.append(Heatmap(back.numpy(), m.numpy(), texts[int(pick[i])], list(heads)))
    return out


def draw(image: Image.Image, hm: Heatmap, path: Path) -> None:
    """The image with the map over it (diverging colours, symmetric scale), captioned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(np.abs(hm.original).max()) or 1.0
    fig, ax = plt.subplots(figsize=(4, 4.6), dpi=100)
    ax.imshow(image.convert("RGB"))
    shown = ax.imshow(hm.original, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55, interpolation="nearest")
    ax.set_axis_off()
    names = hm.heads if len(hm.heads) <= 6 else [*hm.heads[:6], f"+{len(hm.heads) - 6}"]
    heads = "\n".join(", ".join(names[i : i + 4]) for i in range(0, len(names), 4))
    ax.set_title(f'"{hm.text}"\nheads: {heads}', fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay(image: Image.Image, m: np.ndarray, size: int = 128) -> Image.Image:
    """The image with the map ``m [H0, W0]`` (original pixels) over it, as :func:`draw` shows it
    (``bwr``, symmetric scale, 55 % opaque), without a figure; longest side ``size`` (nearest)."""
    from matplotlib import colormaps

    lim = float(np.abs(m).max()) or 1.0
    colour = colormaps["bwr"](np.clip(m / lim, -1, 1) * 0.5 + 0.5)[..., :3]  # [H0, W0, 3]
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    mixed = Image.fromarray(np.round(255 * (0.45 * base + 0.55 * colour)).astype(np.uint8))
    scale = size / max(mixed.size)
    return mixed.resize((max(1, round(mixed.width * scale)), max(1, round(mixed.height * scale))), Image.NEAREST)


def default_images(n: int = 4, seed: int = 7100) -> tuple[list[Image.Image], list[str]]:
    """A few generated scenes of the built-in world (a seed no analysis default uses)."""
    from vitdecomp.world import make_scenes

    scenes = make_scenes(n, seed=seed)
    return [scenes.pil(i) for i in range(n)], [f"world-{seed}-{i:03d}" for i in range(n)]


def run(args: argparse.Namespace) -> int:
    analysis = load_analysis(args.analysis, checkpoint=args.checkpoint)
    if args.images:
        from vitdecomp.imageset import read_image

        images, names = [read_image(p) for p in args.images], [Path(p).stem for p in args.images]
    else:
        images, names = default_images()
    heads = args.heads if args.heads == "auto" else [h.strip() for h in args.heads.split(",") if h.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    maps = heatmaps(analysis, images, text=args.text, feature=args.feature, heads=heads)
    record = []
    for im, name, hm in zip(images, names, maps, strict=True):
        np.save(out / f"{name}.npy", hm.original.astype(np.float32))
        draw(im, hm, out / f"{name}.png")
        record.append({"image": name, "text": hm.text, "heads": hm.heads, "png": f"{name}.png", "npy": f"{name}.npy"})
    (out / "heatmaps.json").write_text(json.dumps({"model": analysis.result.model.name, "maps": record}, indent=1))
    print(f"{len(record)} heatmaps in {out}")
    return 0


def add_heatmap_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "heatmap",
        help="where in each image the chosen heads write along a text: PNG overlays + .npy maps",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("images", nargs="*", help="image files (default: 4 generated world scenes)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help='a description, e.g. "a red object"')
    what.add_argument("--feature", help="a feature of the analysis: per image, its best-matching value")
    p.add_argument(
        "--heads", default="auto", help="auto (top 2 ceil(sqrt(H)) heads by score) or L.H names, comma-separated"
    )
    p.add_argument("--analysis", default="vitdecomp-out", help="folder of a finished `vitdecomp analyze`")
    p.add_argument("--checkpoint", default=None, help="local weights of the analysed model, if it was given one")
    p.add_argument("--out", default="vitdecomp-heatmaps", help="output folder")
    p.set_defaults(func=run)
    return p
