"""``vitdecomp heatmap``: where in each image the chosen heads favour a text over what the image shows
instead.

For each image: the chosen heads' per-token contributions, aligned into CLIP space and projected on
the texts' embeddings (:func:`vitdecomp.apps.token_maps.token_maps`), placed on each token's pixels
in the model's input and mapped back onto the original image through the model's own resize / crop.
The text speaks of a feature (``--feature F``, or the feature whose value texts come closest to
``--text``) and stands for one of its values; the map is specific to that value
(:mod:`vitdecomp.apps.specific`): the text against the image's own alternative (the value the whole
image reads as, or, when it reads as the text's value, the other values), shrunk by the image's null.
A map for a value the image does not show is not positive on its object. ``--feature F`` without
``--text`` maps, per image, the value of F the aligned whole reads best (no labels). A text that
reads as no value of any feature (:data:`MATCH`) is read against every feature's values, without a
null, and says so. ``--heads auto``: the top heads for the feature
(:func:`vitdecomp.apps.analysis.auto_heads`).

:class:`Heatmaps` is an :class:`~vitdecomp.apps.contract.AnalysisApplication`; its result holds, per
image, a figure ``<name>.png`` (the image with the map over it: red positive, blue negative, a
symmetric scale; captioned with the text, what it was read against and the heads) and a file
``<name>.npy`` (the map ``[H, W]`` in the original image's pixels), and ``heatmaps.json`` says what was
used.
"""

from __future__ import annotations

import functools
import io
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vitdecomp.apps.analysis import Analysis, analysis_result, auto_heads, check_heads
from vitdecomp.apps.contract import AnalysisApplication
from vitdecomp.apps.pixels import input_geometry
from vitdecomp.apps.specific import reading, specific_maps
from vitdecomp.apps.token_maps import TokenMaps, token_maps
from vitdecomp.defaults import ANALYSIS_DIR, HEATMAP_OUT, SHOW_SEED
from vitdecomp.errors import ImageReadError, UsageError, VitDecompError
from vitdecomp.figures import figure_png, pyplot
from vitdecomp.results import AppSection, Figure, ResultBase

#: A text stands for the value of a feature it reads as with at least this probability (the reader's
#: zero-shot softmax over the feature's values); below it in every feature, the text matches none.
MATCH = 0.5


@dataclass
class Heatmap:
    """One image's map: ``original [H0, W0]`` (original pixels), ``input [H, W]`` (model input pixels),
    the text it reads, the heads summed, what the text was read against (``against``), the threshold
    applied (``level``, the image's null, :mod:`vitdecomp.apps.specific`), the image's zero-shot
    reading of the text's value (``reading``; ``None`` when the text matches no feature), the colour
    scale (``scale``: the largest ``|value|`` of the map before the null, in original pixels; a map the
    null shrank to specks is drawn faint, not stretched to full colour) and, for a text, the value it
    stands for (``read_as``, ``"<feature>: <value>"``: the reader's closest value, which for a text
    outside the reader's vocabulary may be far from what the text says)."""

    original: np.ndarray
    input: np.ndarray
    text: str
    heads: list[str]
    against: str = ""
    level: float = 0.0
    reading: float | None = None
    scale: float = 0.0
    read_as: str = ""


def whole_scores(maps: TokenMaps, analysis: Analysis, value_emb: torch.Tensor) -> torch.Tensor:
    """``[B, V]``: cosines of the aligned whole representation with each row of ``value_emb [V, d_clip]``."""
    d = maps.decomposition
    whole = d.representation if analysis.aligner is None else analysis.aligner.apply_sum(d.contributions)
    unit = torch.nn.functional.normalize
    return unit(whole.float().cpu(), dim=-1) @ unit(value_emb.float().cpu(), dim=-1).T


def text_value(analysis: Analysis, text_emb: torch.Tensor, feature: str | None = None) -> tuple[str | None, int]:
    """The feature a text embedding ``[d_clip]`` speaks of and the index of the value it reads as:
    ``feature`` when given, else the one whose value texts come closest; ``(None, -1)`` when the
    analysis has no features or the text reads as no value with probability :data:`MATCH`."""
    if feature is None:
        if not analysis.result.features:
            return None, -1
        feature = analysis.feature_of(text_emb)
        values = analysis.embed(list(analysis.result.features[feature]))
        q = reading(values.float() @ text_emb.float(), analysis.logit_scale)
        return (feature, int(q.argmax())) if float(q.max()) >= MATCH else (None, -1)
    values = analysis.embed(list(analysis.result.features[feature]))
    return feature, int((values.float() @ text_emb.float()).argmax())


def _against(alternative: torch.Tensor, values: list[str], feature: str) -> str:
    """In words, what one image's map is read against (its alternative's weights ``[V]``)."""
    best = int(alternative.argmax())
    return values[best] if float(alternative[best]) >= MATCH else f"the other values of {feature}"


def heatmaps(
    analysis: Analysis,
    images: list[Image.Image],
    *,
    text: str | None = None,
    feature: str | None = None,
    heads: list[str] | str = "auto",
) -> list[Heatmap]:
    """Maps of ``images`` along ``text`` (or, per image, the value of ``feature`` it reads best),
    specific to the value (:mod:`vitdecomp.apps.specific`); a text that matches no feature is read
    against every feature's values, without a null (the text minus the mean of every value's text)."""
    if text is None and feature is None:
        raise VitDecompError("give a text (--text) or a feature (--feature)")
    if heads == "auto":
        text_emb = analysis.embed([text])[0] if text is not None else None
        heads = auto_heads(analysis.scores(feature or analysis.feature_of(text_emb)), analysis.result.labels)
    else:
        check_heads(heads, analysis.result.labels, analysis.result.model.name)
    return heatmap_batch(analysis, images, [MapJob(list(range(len(images))), list(heads), text, feature)])[0]


@dataclass(frozen=True)
class MapJob:
    """One set of maps :func:`heatmap_batch` makes: of the images ``rows`` (indices into its images),
    along ``text`` or, per image, the value of ``feature`` it reads best, summing ``heads``."""

    rows: list[int]
    heads: list[str]
    text: str | None = None
    feature: str | None = None


class _Columns:
    """The directions one token-map decomposition reads ``[K, d_clip]``, each added once: a feature's
    value texts (a block of columns), a text, a text read against every value."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis, self.rows, self.where = analysis, [], {}

    def add(self, key: tuple[str, str], emb: torch.Tensor) -> list[int]:
        """The columns of ``emb [n, d_clip]`` (added under ``key`` the first time)."""
        if key not in self.where:
            start = sum(len(r) for r in self.rows)
            self.rows.append(emb)
            self.where[key] = list(range(start, start + len(emb)))
        return self.where[key]

    def feature(self, feature: str) -> list[int]:
        return self.add(("feature", feature), self.analysis.embed(list(self.analysis.result.features[feature])))


def heatmap_batch(analysis: Analysis, images: list[Image.Image], jobs: list[MapJob]) -> list[list[Heatmap]]:
    """Every job's maps (:func:`heatmaps` for each) from one token-map decomposition of ``images``
    along every direction the jobs read (each value text and text once): per job the maps of its own
    images, each exactly what a decomposition of those images alone gives (up to float rounding)."""
    subject, cols, plans = analysis.subject, _Columns(analysis), []
    for job in jobs:
        text_emb = analysis.embed([job.text])[0] if job.text is not None else None
        feature, index = (job.feature, -1) if text_emb is None else text_value(analysis, text_emb, job.feature)
        if feature is None:  # a text that matches no feature
            every = [v for values in analysis.result.features.values() for v in values]
            plain = text_emb[None] - (analysis.embed(every).mean(0, keepdim=True) if every else 0)
            plans.append((job, None, index, cols.add(("plain", job.text), plain), []))
            continue
        own = [] if text_emb is None else cols.add(("text", job.text), text_emb[None])
        plans.append((job, feature, index, cols.feature(feature), own))
    x = torch.stack([subject.preprocess(im.convert("RGB")) for im in images])
    x = x.to(next(subject.model.parameters(), x).device)
    directions = torch.cat([r.float() for r in cols.rows])
    maps = token_maps(subject, x, directions, aligner=analysis.aligner, start_layer=analysis.result.start_layer or 0)
    whole = whole_scores(maps, analysis, directions)  # [B, K]
    out = []
    for job, feature, index, value_cols, own in plans:
        px = maps.pixels(job.heads, rows=job.rows, columns=value_cols + own).float().cpu()
        ims = [images[i] for i in job.rows]
        if feature is None:
            out.append(_plain(analysis, ims, px[:, 0], job.text or "", job.heads))
            continue
        p = reading(whole[job.rows][:, value_cols], analysis.logit_scale)  # [b, V]
        out.append(_specific(analysis, ims, px, p, job, feature, index))
    return out


def _specific(
    analysis: Analysis,
    images: list[Image.Image],
    px: torch.Tensor,
    p: torch.Tensor,
    job: MapJob,
    feature: str,
    index: int,
) -> list[Heatmap]:
    """One job's value-specific maps from its pixels ``px [b, V (+1 text), H, W]`` and reading ``p [b, V]``."""
    values, text = list(analysis.result.features[feature]), job.text
    value = p.argmax(-1) if text is None else torch.full((len(images),), index)
    sm = specific_maps(px[:, : len(values)], p, value, None if text is None else px[:, -1])
    out = []
    for i, im in enumerate(images):
        geo = input_geometry(analysis.subject.preprocess, (im.height, im.width))
        back, whole = geo.to_original(sm.maps[i : i + 1])[0], geo.to_original(sm.contrast[i : i + 1])[0]
        shown = text if text is not None else values[int(value[i])]
        hm = Heatmap(
            back.numpy(), sm.maps[i].numpy(), shown, list(job.heads), _against(sm.alternative[i], values, feature)
        )
        hm.level, hm.reading, hm.scale = float(sm.level[i]), float(sm.p_value[i]), float(whole.abs().max())
        hm.read_as = "" if text is None else f"{feature}: {values[index]}"
        out.append(hm)
    return out


def _plain(
    analysis: Analysis, images: list[Image.Image], px: torch.Tensor, text: str, heads: list[str]
) -> list[Heatmap]:
    """Maps ``px [b, H, W]`` along a text that matches no feature: its embedding minus the mean of every
    feature's value texts (what texts share, "a photo of ..."); no alternative, no null: such a map
    may light any object."""
    out = []
    for i, im in enumerate(images):
        back = input_geometry(analysis.subject.preprocess, (im.height, im.width)).to_original(px[i][None])[0]
        out.append(Heatmap(back.numpy(), px[i].numpy(), text, heads, "every feature's values (no feature matched)"))
    return out


def draw(image: Image.Image, hm: Heatmap) -> bytes:
    """The image with the map over it (diverging colours, symmetric scale), captioned: PNG bytes."""
    plt = pyplot()
    lim = hm.scale or float(np.abs(hm.original).max()) or 1.0
    fig, ax = plt.subplots(figsize=(4, 4.6), dpi=100)
    ax.imshow(image.convert("RGB"))
    shown = ax.imshow(hm.original, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55, interpolation="nearest")
    ax.set_axis_off()
    names = hm.heads if len(hm.heads) <= 6 else [*hm.heads[:6], f"+{len(hm.heads) - 6}"]
    heads = "\n".join(", ".join(names[i : i + 4]) for i in range(0, len(names), 4))
    ax.set_title(f'"{hm.text}"{caption(hm)}\nheads: {heads}', fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return figure_png(fig)


def caption(hm: Heatmap) -> str:
    """What a map was read against, in a few words: ``vs "blue" (reads 0.01)``; a text that stands
    for a value it does not name: ``(as background: sky) vs ...``."""
    if not hm.against:
        return ""
    if hm.read_as and hm.read_as.split(": ", 1)[-1].lower() not in hm.text.lower():
        return f" (as {hm.read_as})" + caption(replace(hm, read_as=""))
    if hm.reading is None:
        return f" vs {hm.against}"
    other = f'"{hm.against}"' if not hm.against.startswith("the other") else hm.against
    return f" vs {other} (reads {hm.reading:.2f})"


def overlay(image: Image.Image, m: np.ndarray, size: int = 128, scale: float = 0.0) -> Image.Image:
    """The image with the map ``m [H0, W0]`` (original pixels) over it, as :func:`draw` shows it
    (``bwr``, symmetric scale ``scale`` or, when 0, ``max |m|``; 55 % opaque), without a figure;
    longest side ``size`` (nearest)."""
    from matplotlib import colormaps

    lim = scale or float(np.abs(m).max()) or 1.0
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
    against: str = ""
    level: float = 0.0
    reading: float | None = None
    scale: float = 0.0
    read_as: str = ""


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
            draw(im, Heatmap(a, a, m.text, m.heads, m.against, m.level, m.reading, m.scale, m.read_as))
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
        rows = [[m.image, m.text, m.against, ", ".join(m.heads)] for m in self.maps]
        summary = (
            f"{len(self.maps)} heatmap(s) of {self.model}: where the chosen heads favour each text over what the "
            "image shows instead, above the image's own null."
        )
        figures = [f.for_section() for f in self.figures()]
        header = ["image", "text", "against", "heads"]
        return AppSection("heatmap", f"Heatmaps ({self.model})", summary, header, rows, figures)


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
            HeatmapRecord(
                n, hm.text, hm.heads, f"{n}.png", f"{n}.npy", hm.against, hm.level, hm.reading, hm.scale, hm.read_as
            )
            for n, hm in zip(names, maps, strict=True)
        ]
        return HeatmapResult(analysis.result.model.name, records, [hm.original for hm in maps], images)
