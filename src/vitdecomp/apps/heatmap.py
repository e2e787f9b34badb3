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

:class:`Heatmaps` is an :class:`~vitdecomp.apps.contract.AnalysisApplication`; its result holds, per
image, a figure ``<name>.png`` (the image with the map over it: red positive, blue negative, a
symmetric scale; captioned with the text and the heads) and a file ``<name>.npy`` (the map ``[H, W]``
in the original image's pixels), and ``heatmaps.json`` says what was used.
"""

from __future__ import annotations

import functools
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vitdecomp.apps.analysis import Analysis, analysis_result, auto_heads, check_heads
from vitdecomp.apps.contract import AnalysisApplication
from vitdecomp.apps.pixels import input_geometry
from vitdecomp.apps.token_maps import TokenMaps, token_maps
from vitdecomp.defaults import ANALYSIS_DIR, HEATMAP_OUT, SHOW_SEED
from vitdecomp.errors import ImageReadError, UsageError, VitDecompError
from vitdecomp.figures import figure_png, pyplot
from vitdecomp.results import AppSection, Figure, ResultBase


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
    else:
        check_heads(heads, analysis.result.labels, analysis.result.model.name)
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


def draw(image: Image.Image, hm: Heatmap) -> bytes:
    """The image with the map over it (diverging colours, symmetric scale), captioned: PNG bytes."""
    plt = pyplot()
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
    return figure_png(fig)


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


def default_images(n: int = 4, seed: int = SHOW_SEED) -> tuple[list[Image.Image], list[str]]:
    """A few generated scenes of the built-in world (a seed no analysis default uses)."""
    from vitdecomp.world import make_scenes

    scenes = make_scenes(n, seed=seed)
    return [scenes.pil(i) for i in range(n)], [f"world-{seed}-{i:03d}" for i in range(n)]


# ---------------------------------------------------------------------------- the application


@dataclass(kw_only=True)
class HeatmapConfig:
    """Options of ``vitdecomp heatmap``: the image files (none: 4 generated scenes; ``skip_bad_images``:
    skip the unreadable ones), the ``text`` or the ``feature`` the maps read, the ``heads`` (``"auto"``
    or names), the analysis folder (its models loaded on ``device``, the subject from ``checkpoint``
    when it was given one) and the folder the command writes to."""

    images: tuple[str, ...] = ()
    skip_bad_images: bool = False
    text: str | None = None
    feature: str | None = None
    heads: str | tuple[str, ...] = "auto"
    analysis: str | Path = ANALYSIS_DIR
    checkpoint: str | Path | None = None
    device: str | None = "cpu"
    out: str | Path = HEATMAP_OUT


def read_images(cfg: HeatmapConfig) -> tuple[list[Image.Image], list[str], list[str]]:
    """``(images, names, skipped)`` of ``cfg.images`` (none: a few generated scenes); an unreadable
    file stops with its name, or is skipped with ``cfg.skip_bad_images``."""
    if not cfg.images:
        return (*default_images(), [])
    from vitdecomp.imageset import read_image, with_skip_hint

    images, names, skipped = [], [], []
    for p in cfg.images:
        try:
            images.append(read_image(p))
        except ImageReadError as err:
            if not cfg.skip_bad_images:
                raise ImageReadError(with_skip_hint(str(err))) from err
            skipped.append(str(err))
            continue
        names.append(Path(p).stem)
    if not images:
        raise ImageReadError(f"none of the {len(cfg.images)} image(s) could be read: {skipped[0]}")
    return images, names, skipped


@dataclass
class HeatmapRecord:
    """One image's map as ``heatmaps.json`` lists it (the arrays go to ``<image>.png`` / ``.npy``)."""

    image: str
    text: str
    heads: list[str]
    png: str
    npy: str


@dataclass
class HeatmapResult(ResultBase):
    """The maps of ``vitdecomp heatmap``: ``maps`` as ``heatmaps.json`` lists them, the arrays and
    pictures behind them (``figures()``: one PNG per image, ``files()``: one ``.npy`` per image)."""

    name: ClassVar[str] = "heatmap"
    json_name: ClassVar[str] = "heatmaps"

    model: str
    maps: list[HeatmapRecord]
    arrays: list[np.ndarray] = field(default_factory=list, repr=False)
    images: list[Image.Image] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "maps": [vars(m).copy() for m in self.maps]}

    def figures(self) -> list[Figure]:
        return [Figure(Path(m.png).stem, png, f'"{m.text}"') for m, png in zip(self.maps, self._pngs, strict=True)]

    @functools.cached_property
    def _pngs(self) -> list[bytes]:
        return [
            draw(im, Heatmap(a, a, m.text, m.heads))
            for im, a, m in zip(self.images, self.arrays, self.maps, strict=True)
        ]

    def files(self) -> dict[str, bytes]:
        out = {}
        for m, a in zip(self.maps, self.arrays, strict=True):
            buf = io.BytesIO()
            np.save(buf, a.astype(np.float32))
            out[m.npy] = buf.getvalue()
        return out

    def section(self) -> AppSection:
        rows = [[m.image, m.text, ", ".join(m.heads)] for m in self.maps]
        summary = f"{len(self.maps)} heatmap(s) of {self.model}: where the chosen heads write along each text."
        figures = [f.for_section() for f in self.figures()]
        return AppSection("heatmap", f"Heatmaps ({self.model})", summary, ["image", "text", "heads"], rows, figures)


class Heatmaps(AnalysisApplication[HeatmapConfig, HeatmapResult]):
    """``vitdecomp heatmap``: the maps of the given images (or a few generated scenes)."""

    name = "heatmap"

    def check(self, cfg: HeatmapConfig) -> None:
        """The text or feature, the named heads (against the analysis' components) and the images,
        before any model loads."""
        if cfg.text is None and cfg.feature is None:
            raise VitDecompError("give a text (--text) or a feature (--feature)")
        result = analysis_result(cfg.analysis)
        if cfg.feature is not None and cfg.feature not in result.features:
            raise UsageError(
                f"--feature {cfg.feature}: not a feature of this analysis; its features: {sorted(result.features)}"
            )
        if cfg.heads != "auto":
            check_heads(cfg.heads, result.labels, result.model.name)
        for skipped in read_images(cfg)[2]:
            print(f"vitdecomp: skipped: {skipped}", file=sys.stderr)

    def measure(self, cfg: HeatmapConfig, analysis: Analysis) -> HeatmapResult:
        images, names, _ = read_images(cfg)
        heads = cfg.heads if cfg.heads == "auto" else list(cfg.heads)
        maps = heatmaps(analysis, images, text=cfg.text, feature=cfg.feature, heads=heads)
        records = [
            HeatmapRecord(n, hm.text, hm.heads, f"{n}.png", f"{n}.npy") for n, hm in zip(names, maps, strict=True)
        ]
        return HeatmapResult(analysis.result.model.name, records, [hm.original for hm in maps], images)
