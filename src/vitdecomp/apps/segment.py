"""``vitdecomp segment``: zero-shot segmentation from the decomposition's token contributions, against
GradCAM and Chefer et al.'s rollout, all three explaining the same scalar and scored by the same
metrics (:mod:`vitdecomp.apps.seg_metrics`).

What is explained (label-free, the same for every method): ``--target predicted`` (models with a
classifier) — the logit of the model's own predicted value; for the zoo's multi-attribute heads, of
``--feature`` (default colour); for other classifiers, the top class. ``--target self`` (models without
a classifier, e.g. zoo:dino) — the image's own representation, centred on the set's mean: the scalar
``<r(x), r(x) - mean r>``. Both are a direction ``u`` on the representation, one per image.

The decomposition's map: every attention head of every layer, each source token's contribution
projected on ``u`` (:func:`vitdecomp.apps.token_maps.token_maps` in the model's own space), its
positive part (the evidence *for* the target), summed over heads and layers; each stage's token grid
upsampled bilinearly to the input, as the published code and Chefer et al.'s do. Every layer, not
the published code's later half (blocks 5-11 of 12): the zoo models have 3-5 blocks and their first
ones carry most of the localised contribution (docs/applications.md has the measurement).

Images and masks: ``--images DIR --masks DIR`` matched by file stem; ``--world DIR`` for a
``vitdecomp world export`` folder (its ``masks/``); neither: ``--n`` fresh generated scenes. A mask is
any image file where non-zero is object (greyscale, palette indices, or any RGB channel; alpha
ignored). A mask of another size than its image is resized to it with nearest-neighbour sampling (and
listed). Images without a mask are skipped and listed; unreadable masks stop the run with the file named.
Masks are carried into the model's input through its own resize / crop; scores are on input pixels.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from vitdecomp.apps.chefer import CheferMap, why_not
from vitdecomp.apps.gradcam import GradCamMap, cam_layer
from vitdecomp.apps.pixels import InputGeometry, input_geometry
from vitdecomp.apps.relevance import RelevanceMap, Representation, network
from vitdecomp.apps.seg_metrics import THRESHOLD_RULE, SegAccumulator, SegMetrics, binarize
from vitdecomp.apps.token_maps import TokenMaps, token_maps
from vitdecomp.errors import VitDecompError
from vitdecomp.fsio import atomic_write_bytes, atomic_write_text
from vitdecomp.imageset import IMAGE_SUFFIXES, display_name, list_images, read_image
from vitdecomp.report.attach import add_report_argument, attach_if_asked, check_report
from vitdecomp.results import AppFigure, AppSection

#: Layers the decomposition's map sums, in words (``DecompositionMap(layers=None)``).
LAYERS_RULE = (
    "every attention head of every layer; positive part of each (head, token) term; summed; token grids upsampled "
    "bilinearly"
)
TIMING_RULE = "one process, methods alternating batch by batch, 1 thread, on a shared (loaded) machine"


class DecompositionMap:
    """The relevance-map contract for the decomposition: per image, every head's per-token contribution
    (of ``layers``; ``None``: all) projected on the image's direction; the positive part of each
    (head, token) term (``positive="per_head"``; ``"sum"``: of the summed map, as the published code;
    ``"none"``), summed, each token grid upsampled bilinearly to the input (as the baselines' grids are)."""

    name = "decomposition"

    def __init__(self, layers: list[int] | None = None, positive: str = "per_head") -> None:
        if positive not in ("per_head", "sum", "none"):
            raise ValueError(f"positive must be per_head, sum or none, not {positive!r}")
        self.layers, self.positive = layers, positive

    def __call__(self, model: object, images: Tensor, directions: Tensor) -> Tensor:
        unique, which = torch.unique(directions.float(), dim=0, return_inverse=True)  # [k, D], [B]
        maps = token_maps(model, images, unique, layers=self.layers)
        if self.positive == "per_head":
            maps.values = [v.clamp_min(0) for v in maps.values]
        px = bilinear_pixels(maps)[torch.arange(len(images)), which]
        return px.clamp_min(0) if self.positive == "sum" else px


def bilinear_pixels(maps: TokenMaps) -> Tensor:
    """``[B, k, H, W]``: all heads' relevance (densities, prefix tokens left out), each stage's token
    grid laid out from the tokens' pixel boxes and upsampled bilinearly to the input, summed."""
    per_stage = maps.select(None)  # [B, N_s, k]
    b, k = per_stage[0].shape[0], per_stage[0].shape[2]
    h, w = maps.input_size
    out = per_stage[0].new_zeros(b, k, h, w)
    for v, boxes, npre in zip(per_stage, maps.boxes, maps.prefix, strict=True):
        box, v = boxes[npre:].long(), v[:, npre:]
        keep = box[:, 0] >= 0
        box, v = box[keep], v[:, keep]
        bh, bw = int((box[:, 2] - box[:, 0]).max()), int((box[:, 3] - box[:, 1]).max())
        rows, cols = box[:, 0] // bh, box[:, 1] // bw
        grid = v.new_zeros(b, k, int(rows.max()) + 1, int(cols.max()) + 1)
        grid[:, :, rows, cols] = (v / (bh * bw)).permute(0, 2, 1)
        up = F.interpolate(grid, size=(grid.shape[2] * bh, grid.shape[3] * bw), mode="bilinear")
        out += up[:, :, :h, :w]
    return out


# ---------------------------------------------------------------------------- images and masks


@dataclass
class SegmentSet:
    """Images with their object masks ``[H0, W0]`` bool (original pixels); what was skipped / resized."""

    names: list[str]
    images: list[Image.Image]
    masks: list[np.ndarray]
    description: str
    skipped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def read_mask(path: Path) -> np.ndarray:
    """``[H, W]`` bool: non-zero = object (any RGB channel; palette indices; alpha ignored)."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "LA", "PA") else im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise VitDecompError(f"mask {display_name(path)} cannot be read: {err}") from err
    return a.any(-1) if a.ndim == 3 else a != 0


def world_set(n: int, seed: int) -> SegmentSet:
    """``n`` generated scenes of the built-in world with their object masks."""
    from vitdecomp.world import make_scenes

    s = make_scenes(n, seed=seed)
    names = [f"world-{seed}-{i:06d}" for i in range(n)]
    desc = f"{n} generated world scenes (seed {seed})"
    return SegmentSet(names, [s.pil(i) for i in range(n)], list(s.masks.astype(bool)), desc)


def folder_set(images: str | Path, masks: str | Path, n: int | None = None) -> SegmentSet:
    """Images under ``images`` with the mask of the same file stem under ``masks`` (see the module text)."""
    masks = Path(masks)
    if not masks.is_dir():
        raise VitDecompError(f"not a folder of masks: {display_name(masks)}")
    by_stem: dict[str, Path] = {}
    for p in sorted(masks.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."):
            if p.stem in by_stem:
                raise VitDecompError(f"two masks share the stem {p.stem!r}: {by_stem[p.stem]} and {display_name(p)}")
            by_stem[p.stem] = p
    out = SegmentSet([], [], [], f"images from {display_name(images)}, masks from {display_name(masks)}")
    inside = masks.resolve()
    for path in list_images(images):
        if n is not None and len(out.names) >= n:
            break
        if inside in path.resolve().parents:  # a masks folder inside the images folder
            continue
        mask_path = by_stem.get(path.stem)
        if mask_path is None:
            out.skipped.append(display_name(path))
            continue
        im, mask = read_image(path), read_mask(mask_path)
        if mask.shape != (im.height, im.width):
            out.resized.append(f"{display_name(mask_path)} {mask.shape[1]}x{mask.shape[0]} -> {im.width}x{im.height}")
            mask = np.asarray(Image.fromarray(mask).resize(im.size, Image.NEAREST))
        out.names.append(path.stem)
        out.images.append(im)
        out.masks.append(mask)
    if not out.names:
        raise VitDecompError(f"no image under {display_name(images)} has a mask (same file stem) in {masks}")
    return out


def to_input(a: np.ndarray, geo: InputGeometry, resample: int) -> np.ndarray:
    """An ``[H0, W0(, 3)]`` uint8 array of the original image's frame in the model's input frame
    (resize then crop as the model's preprocessing does; zero where the input lies outside)."""
    im = Image.fromarray(a).resize((geo.resized[1], geo.resized[0]), resample)
    r = np.asarray(im)
    out = np.zeros((*geo.crop, *r.shape[2:]), dtype=r.dtype)
    top, left = geo.offset
    ys, xs = max(top, 0), max(left, 0)
    ye, xe = min(top + geo.crop[0], r.shape[0]), min(left + geo.crop[1], r.shape[1])
    out[ys - top : ye - top, xs - left : xe - left] = r[ys:ye, xs:xe]
    return out


# ---------------------------------------------------------------------------- what is explained


@dataclass
class Targets:
    """One direction per image on the representation ``directions [N, D]``, what each one is, the rule."""

    directions: Tensor
    what: list[str]
    rule: str


def _classifier(net: torch.nn.Module) -> torch.nn.Linear | None:
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return head if isinstance(head, torch.nn.Linear) and head.out_features > 0 else None


def choose_targets(model: object, reps: Tensor, rule: str = "auto", feature: str = "color") -> Targets:
    """Directions for ``reps [N, D]`` (the images' representations) under ``rule``: ``predicted``,
    ``self`` or ``auto`` (predicted when the model has a linear classifier, else self)."""
    head = _classifier(network(model))
    if rule == "auto":
        rule = "predicted" if head is not None else "self"
    if rule == "self":
        what = ["own representation (centred)"] * len(reps)
        return Targets(reps - reps.mean(0), what, "self: <r(x), r(x) - mean r> (the image's own representation)")
    if rule != "predicted":
        raise VitDecompError(f"unknown target {rule!r}: predicted, self or auto")
    if head is None:
        raise VitDecompError("--target predicted needs a model with a linear classifier; use --target self")
    start, names, feature = _block(model, head, feature)
    logits = reps @ head.weight[start : start + len(names)].T.detach()
    pred = logits.argmax(1)
    directions = head.weight.detach()[start + pred].float()
    what = [f"{feature}={names[int(p)]}" if feature else f"class {names[int(p)]}" for p in pred]
    label = f"feature {feature!r}" if feature else "all classes"
    return Targets(directions, what, f"predicted: the logit of the model's own top value ({label})")


def _block(model: object, head: torch.nn.Linear, feature: str) -> tuple[int, list[str], str | None]:
    """The zoo's logit block of ``feature`` (start, value names, feature), or every class of another
    classifier (feature ``None``)."""
    from vitdecomp.world.attributes import ATTRIBUTES
    from vitdecomp.zoo.models import HEAD_SIZES, NUM_LOGITS

    if getattr(model, "source", "") != "zoo" or head.out_features != NUM_LOGITS:
        return 0, [str(i) for i in range(head.out_features)], None
    order = list(HEAD_SIZES)
    if feature not in order:
        raise VitDecompError(f"no logit block {feature!r} in this zoo model; blocks: {order}")
    return sum(HEAD_SIZES[k] for k in order[: order.index(feature)]), list(ATTRIBUTES[feature]), feature


# ---------------------------------------------------------------------------- running and scoring


@dataclass
class MethodScore:
    """One method's scores (``None`` where it does not apply: ``note`` says why) and its speed."""

    name: str
    metrics: SegMetrics | None
    maps_per_s: float | None
    note: str = ""


@dataclass
class SegmentResult:
    """What ``vitdecomp segment`` measured; ``section()`` is its part of the report."""

    model: str
    images: str
    n_images: int
    target: str
    layers: str
    threshold: str
    timing: str
    methods: list[MethodScore]
    skipped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    targets: dict[str, int] = field(default_factory=dict)
    command: str = ""
    figure: str | None = None
    figure_png: bytes | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("figure_png")
        return d

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The per-method metric table (header, formatted rows)."""
        header = ["method", "pixel acc.", "mIoU", "IoU object (cum. foreground)", "IoU background", "mAP", "maps/s"]
        rows = []
        for m in self.methods:
            if m.metrics is None:
                rows.append([m.name, *["n/a"] * 5, "-"])
                continue
            s = m.metrics
            vals = [s.pixel_accuracy, s.miou, s.cumulative_foreground_iou, s.iou_background, s.mean_ap]
            rows.append([m.name, *(f"{v:.3f}" for v in vals), f"{m.maps_per_s:.1f}"])
        return header, rows

    def markdown(self) -> str:
        header, rows = self.table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"

    def section(self) -> AppSection:
        """This run as a section of the report (:class:`vitdecomp.results.AppSection`)."""
        header, rows = self.table()
        scored = {m.name: m.metrics.miou for m in self.methods if m.metrics is not None}
        best = max(scored, key=scored.get) if scored else "none"
        summary = (
            f"On {self.n_images} images of {self.images}, {self.model}: mIoU "
            + ", ".join(f"{k} {v:.3f}" for k, v in scored.items())
            + f" (best: {best})."
        )
        png = self.figure_png
        if png is None and self.figure and Path(self.figure).exists():
            png = Path(self.figure).read_bytes()
        figures = [] if png is None else [AppFigure(png_data_uri(png), "image, mask outline, each method's map")]
        notes = [f"target: {self.target}", f"decomposition layers: {self.layers}", f"threshold: {self.threshold}"]
        notes += [f"speed: {self.timing}"]
        notes += [f"{m.name}: {m.note}" for m in self.methods if m.note]
        if self.skipped:
            notes.append(f"{len(self.skipped)} image(s) without a mask skipped, e.g. {self.skipped[0]}")
        return AppSection("segment", "Zero-shot segmentation", summary, header, rows, figures, self.command, notes)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def default_methods() -> list[RelevanceMap]:
    return [DecompositionMap(), GradCamMap(), CheferMap()]


def _applies(method: RelevanceMap, model: object) -> str:
    """Empty when ``method`` applies to ``model``, else why not."""
    if isinstance(method, CheferMap):
        return why_not(model) or ""
    if isinstance(method, GradCamMap):
        try:
            cam_layer(model)
        except VitDecompError as err:
            return str(err)
    return ""


@dataclass
class _Batch:
    x: Tensor  # [B, 3, H, W]
    masks: Tensor  # [B, H, W] bool, input frame
    shown: list[np.ndarray]  # the images in the input frame, uint8 [H, W, 3]


def _batches(model: object, data: SegmentSet, batch: int) -> list[_Batch]:
    pre = model.preprocess
    out = []
    for s in range(0, len(data.names), batch):
        ims, mks = data.images[s : s + batch], data.masks[s : s + batch]
        geos = [input_geometry(pre, (im.height, im.width)) for im in ims]
        x = torch.stack([pre(im.convert("RGB")) for im in ims])
        masks = [to_input(m.astype(np.uint8) * 255, g, Image.NEAREST) > 0 for m, g in zip(mks, geos, strict=True)]
        shown = [to_input(np.asarray(im.convert("RGB")), g, Image.BILINEAR) for im, g in zip(ims, geos, strict=True)]
        out.append(_Batch(x, torch.from_numpy(np.stack(masks)), shown))
    return out


def segment(
    model: object,
    data: SegmentSet,
    *,
    target: str = "auto",
    feature: str = "color",
    methods: list[RelevanceMap] | None = None,
    batch: int = 25,
    show: int = 4,
) -> SegmentResult:
    """Every method's maps of ``data`` explaining the same per-image target, scored by the same metrics;
    maps per second timed side by side (methods alternate batch by batch)."""
    methods = methods or default_methods()
    batches = _batches(model, data, batch)
    with torch.no_grad():
        reps = torch.cat([Representation(network(model))(b.x) for b in batches]).float()
    targets = choose_targets(model, reps, target, feature)
    notes = {m.name: _applies(m, model) for m in methods}
    live = [m for m in methods if not notes[m.name]]
    acc = {m.name: SegAccumulator() for m in live}
    seconds = dict.fromkeys(notes, 0.0)
    kept: dict[str, list[Tensor]] = {m.name: [] for m in live}
    start = 0
    for i, b in enumerate(tqdm(batches, desc="segment", unit="batch")):
        u = targets.directions[start : start + len(b.x)]
        start += len(b.x)
        for m in live[i % len(live) :] + live[: i % len(live)]:
            t0 = time.perf_counter()
            maps = m(model, b.x, u).detach().float()
            seconds[m.name] += time.perf_counter() - t0
            acc[m.name].add(maps, b.masks)
            if sum(len(k) for k in kept[m.name]) < show:
                kept[m.name].append(maps[: show - sum(len(k) for k in kept[m.name])])
    scores = [
        MethodScore(m.name, acc[m.name].result() if not notes[m.name] else None, None, notes[m.name]) for m in methods
    ]
    for s in scores:
        s.maps_per_s = len(data.names) / seconds[s.name] if s.metrics is not None and seconds[s.name] else None
    shown = [im for b in batches for im in b.shown][:show]
    shown_masks = torch.cat([b.masks for b in batches])[:show]
    png = draw_grid(shown, shown_masks, {k: torch.cat(v) for k, v in kept.items()}, targets.what[:show])
    counts: dict[str, int] = {}
    for w in targets.what:
        counts[w] = counts.get(w, 0) + 1
    return SegmentResult(
        model=getattr(model, "name", type(network(model)).__name__),
        images=data.description,
        n_images=len(data.names),
        target=targets.rule,
        layers=LAYERS_RULE,
        threshold=THRESHOLD_RULE,
        timing=TIMING_RULE,
        methods=scores,
        skipped=data.skipped,
        resized=data.resized,
        targets=counts,
        figure_png=png,
    )


def draw_grid(images: list[np.ndarray], masks: Tensor, maps: dict[str, Tensor], what: list[str]) -> bytes:
    """A PNG: one row per image — the image with the mask outline, then each method's map (min-max
    normalised, mask outline in cyan, the thresholded region hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.1 * cols, 2.2 * len(images)), squeeze=False, dpi=100)
    for r, im in enumerate(images):
        mask = masks[r].numpy().astype(float)
        axes[r, 0].imshow(im)
        axes[r, 0].contour(mask, levels=[0.5], colors="cyan", linewidths=1)
        axes[r, 0].set_title(what[r], fontsize=7)
        for c, (name, m) in enumerate(maps.items(), start=1):
            v = m[r].numpy()
            v = (v - v.min()) / max(float(v.max() - v.min()), 1e-30)
            axes[r, c].imshow(v, cmap="inferno", vmin=0, vmax=1)
            axes[r, c].contour(
                binarize(m[r][None])[0].numpy().astype(float),
                levels=[0.5],
                colors="white",
                linewidths=0.6,
                linestyles="dashed",
            )
            axes[r, c].contour(mask, levels=[0.5], colors="cyan", linewidths=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------- command line


def _data(args: argparse.Namespace) -> SegmentSet:
    if args.world is not None:
        if args.images is not None or args.masks is not None:
            raise VitDecompError("give --world DIR, or --images DIR with --masks DIR, not both")
        return folder_set(args.world, Path(args.world) / "masks", args.n)
    if (args.images is None) != (args.masks is None):
        raise VitDecompError("--images and --masks go together (masks matched to images by file stem)")
    if args.images is not None:
        return folder_set(args.images, args.masks, args.n)
    return world_set(args.n or 200, args.seed)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options that matter, defaults spelled out)."""
    parts = ["vitdecomp", "segment", "--model", args.model]
    for flag in ("checkpoint", "world", "images", "masks", "n"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    if args.world is None and args.images is None:
        parts += ["--seed", str(args.seed)]
    parts += ["--target", args.target, "--feature", args.feature, "--methods", args.methods]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from vitdecomp.pipeline.stages import load_model_for

    if args.report is not None:
        check_report(args.report)
    data = _data(args)
    model = load_model_for(args.model, args.checkpoint)
    names = {m.name: m for m in default_methods()}
    wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise VitDecompError(f"unknown method(s) {unknown}: choose from {', '.join(names)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = segment(
        model,
        data,
        target=args.target,
        feature=args.feature,
        methods=[names[w] for w in wanted],
        batch=args.batch,
        show=args.show,
    )
    result.command = _command(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if result.figure_png is not None:
        atomic_write_bytes(out / "segment.png", result.figure_png)
        result.figure = str(out / "segment.png")
    atomic_write_text(out / "segment.json", json.dumps(result.to_dict(), indent=1))
    atomic_write_text(out / "metrics.md", result.markdown())
    print(result.markdown(), end="")
    if data.skipped:
        print(f"skipped {len(data.skipped)} image(s) without a mask: {', '.join(data.skipped[:3])}")
    if data.resized:
        print(f"resized {len(data.resized)} mask(s) to their image (nearest): {data.resized[0]}")
    print(f"segment.json, metrics.md, segment.png in {out}")
    attach_if_asked(args.report, result.section())
    return 0


def add_segment_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="zero-shot segmentation from token contributions vs GradCAM and Chefer et al., scored on masks",
        description=(
            "Relevance maps of the model's own prediction from the decomposition's token contributions, GradCAM "
            "and Chefer et al.'s rollout, scored against object masks (pixel accuracy, mIoU, cumulative foreground "
            "IoU, mAP). Masks: non-zero = object, matched to images by file stem. See docs/applications.md."
        ),
    )
    p.add_argument("--model", default="zoo:deit", help="model name (as for analyze)")
    p.add_argument("--checkpoint", default=None, help="local weights for the model")
    p.add_argument("--images", default=None, help="folder of images (with --masks)")
    p.add_argument("--masks", default=None, help="folder of masks, matched to images by file stem; non-zero = object")
    p.add_argument("--world", default=None, help="a `vitdecomp world export` folder (images/ and masks/)")
    p.add_argument("--n", type=int, default=None, help="at most this many images (generated world: default 200)")
    p.add_argument("--seed", type=int, default=7100, help="seed of the generated scenes (no folder given)")
    p.add_argument("--target", default="auto", choices=["auto", "predicted", "self"], help="what every map explains")
    p.add_argument("--feature", default="color", help="zoo models: the logit block --target predicted explains")
    p.add_argument("--methods", default="decomposition,gradcam,chefer", help="comma-separated")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--show", type=int, default=4, help="images in the figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="vitdecomp-segment", help="output folder")
    add_report_argument(p)
    p.set_defaults(func=run)
    return p
