"""``vitdecomp segment``: zero-shot segmentation from the decomposition's token contributions, against
GradCAM and Chefer et al.'s rollout, all three explaining the same scalar and scored by the same
metrics (:mod:`vitdecomp.apps.seg_metrics`).

What is explained (label-free, the same for every method): ``--target predicted`` (models with a
classifier) — the model's own predicted value; for the zoo's multi-attribute heads, of ``--feature``
(default colour); for other classifiers, the top class. ``--target wrong`` — per image a value the model
does not predict (seeded): the wrong-prompt test, whose maps should not light the object.
``--contrast expected`` (default) reads the value's logit against the image's expected alternative
(the other values weighted by the model's softmax, :mod:`vitdecomp.apps.specific`); ``none``, the
logit alone, as the published methods explain a class. ``--target self`` (models without a
classifier, e.g. zoo:simclr) — the image's own representation, centred on the set's mean: the scalar
``<r(x), r(x) - mean r>``. Each is a direction ``u`` on the representation, one per image.

The decomposition's map: every attention head of every layer, each source token's contribution
projected on ``u`` (:func:`vitdecomp.apps.token_maps.token_maps` in the model's own space), its
positive part (the evidence *for* the target), summed over heads and layers; each stage's token grid
upsampled bilinearly to the input, as the published code and Chefer et al.'s do. Against the expected
alternative, these terms are kept only where the signed map passes the image's null (the median peak
of maps between two values the model does not read, lowered by the model's probability of the value):
a value the model does not see gets no map on the object. Every layer, not the published code's later
half (blocks 5-11 of 12): the zoo models have 3-5 blocks and their first ones carry most of the
localised contribution (docs/applications.md has the measurement).

Images and masks (:mod:`vitdecomp.apps.masks`): ``--images DIR --masks DIR`` matched by file stem;
``--world DIR`` for a ``vitdecomp world export`` folder (its ``masks/``); ``--mat FILE`` for
ImageNet-segmentation's ``gtsegs_ijcv.mat`` (:mod:`vitdecomp.apps.imagenet_seg`); none: ``--n-images``
fresh generated scenes. Masks are carried into the model's input through its own resize / crop, or
(``--resize square``, the default for ``--mat``: the published protocol) image and mask are resized to
the model's input square with no crop; scores are on input pixels. On ``--mat`` the result also holds
the published figures beside its own (:meth:`SegmentResult.benchmark_table`, ``benchmark.json``).
:class:`Segment` is a :class:`~vitdecomp.apps.contract.ModelApplication`.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from vitdecomp.apps.chefer import CheferMap, why_not
from vitdecomp.apps.contract import ModelApplication
from vitdecomp.apps.gradcam import GradCamMap, cam_layer
from vitdecomp.apps.imagenet_seg import N_PUBLISHED, read_mat
from vitdecomp.apps.masks import SegmentSet, folder_set, to_input, world_set
from vitdecomp.apps.pixels import input_geometry, input_size, square_preprocess
from vitdecomp.apps.published import SEGMENTATION_METRICS, THIS_RUN, BenchmarkTable, Row, published_segmentation
from vitdecomp.apps.relevance import RelevanceMap, Representation, network
from vitdecomp.apps.seg_metrics import THRESHOLD_RULE, SegAccumulator, SegMetrics, binarize
from vitdecomp.apps.specific import ValueContext, alternatives, shrink, shrink_level
from vitdecomp.apps.token_maps import TokenMaps, token_maps
from vitdecomp.checks import check_at_least
from vitdecomp.defaults import MODEL, SEGMENT_BATCH_SIZE, SEGMENT_OUT, SEGMENT_SHOW, SHOW_SEED
from vitdecomp.errors import VitDecompError
from vitdecomp.figures import figure_png, pyplot
from vitdecomp.models.loaded import LoadedModel
from vitdecomp.results import AppSection, Figure, ResultBase

#: Layers the decomposition's map sums, in words (``DecompositionMap(layers=None)``).
LAYERS_RULE = (
    "every attention head of every layer; positive part of each (head, token) term; summed; token grids upsampled "
    "bilinearly"
)
#: Generated scenes scored when no folder is given.
N_WORLD_IMAGES = 200
#: ``--resize``: how images and masks enter the model (``auto``: ``square`` for ``--mat``, else ``model``).
RESIZES = ("auto", "model", "square")


def timing_rule() -> str:
    """How the maps' speed was measured, with this process' torch threads."""
    return f"one process, methods alternating batch by batch, {torch.get_num_threads()} torch thread(s)"


class DecompositionMap:
    """The relevance-map contract for the decomposition: per image, every head's per-token contribution
    (of ``layers``; ``None``: all) projected on the image's direction; the positive part of each
    (head, token) term (``positive="per_head"``; ``"sum"``: of the summed map, as the published code;
    ``"none"``), summed, each token grid upsampled bilinearly to the input (as the baselines' grids are).

    With a :class:`~vitdecomp.apps.specific.ValueContext` (the direction is a value against the image's
    alternative) the map is value-specific: the same terms, kept only where the signed map passes the
    image's null (:mod:`vitdecomp.apps.specific`; ``"sum"``: the shrunk signed map's positive part,
    ``"none"``: the shrunk signed map)."""

    name = "decomposition"

    def __init__(self, layers: list[int] | None = None, positive: str = "per_head") -> None:
        if positive not in ("per_head", "sum", "none"):
            raise ValueError(f"positive must be per_head, sum or none, not {positive!r}")
        self.layers, self.positive = layers, positive

    def __call__(
        self, model: object, images: Tensor, directions: Tensor, context: ValueContext | None = None
    ) -> Tensor:
        if context is not None:
            return self._specific(model, images, directions, context)
        unique, which = torch.unique(directions.float(), dim=0, return_inverse=True)  # [k, D], [B]
        maps = token_maps(model, images, unique, layers=self.layers)
        if self.positive == "per_head":
            maps.values = [v.clamp_min(0) for v in maps.values]
        px = bilinear_pixels(maps)[torch.arange(len(images)), which]
        return px.clamp_min(0) if self.positive == "sum" else px

    def _specific(self, model: object, images: Tensor, directions: Tensor, context: ValueContext) -> Tensor:
        """``[B, H, W]``: the value-specific map (class text) of each image's direction."""
        rows, b = torch.arange(len(images)), len(images)
        cand = context.candidates()
        # one decomposition: each image's direction, then the values its null reads
        both = torch.cat([directions.float().cpu(), context.classes[cand].float().cpu()]).to(directions.device)
        maps = token_maps(model, images, both, layers=self.layers)
        px = bilinear_pixels(maps)  # [B, B + len(cand), H, W]
        signed, values = px[rows, rows], px[:, b:]
        p = context.reading[:, cand].float().cpu()
        p = p / p.sum(-1, keepdim=True)
        value = torch.searchsorted(cand, context.value.long().cpu())
        shrunk = shrink(signed, shrink_level(values, p, value).to(signed))
        if self.positive == "none":
            return shrunk
        if self.positive == "sum":
            return shrunk.clamp_min(0)
        maps.values = [v[..., :b].clamp_min(0) for v in maps.values]
        return bilinear_pixels(maps)[rows, rows] * (shrunk > 0)


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


# ---------------------------------------------------------------------------- what is explained


@dataclass
class Targets:
    """One direction per image on the representation ``directions [N, D]``, what each one is, the rule,
    and (a value against the image's alternative) what the decomposition's value-specific map needs."""

    directions: Tensor
    what: list[str]
    rule: str
    context: ValueContext | None = None


def _classifier(net: torch.nn.Module) -> torch.nn.Linear | None:
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return head if isinstance(head, torch.nn.Linear) and head.out_features > 0 else None


#: Which value each image's map explains (``auto``: predicted with a classifier, else self).
TARGETS = ("auto", "predicted", "wrong", "self")
#: What the explained scalar is read against: the image's expected alternative, or nothing (the logit).
CONTRASTS = ("expected", "none")


def choose_targets(
    model: object,
    reps: Tensor,
    rule: str = "auto",
    feature: str = "color",
    contrast: str = "expected",
    seed: int = 0,
) -> Targets:
    """Directions for ``reps [N, D]`` (the images' representations) under ``rule`` (:data:`TARGETS`):
    ``predicted`` — the model's own top value; ``wrong`` — per image a value it does not predict (a
    seeded draw, the wrong-prompt test); ``self``. A value's direction is its logit row against the
    image's expected alternative (``contrast="expected"``: ``w_v - sum_u a_u w_u``, ``a`` the model's
    softmax with ``v``'s share spread over the other values, :func:`vitdecomp.apps.specific.alternatives`)
    or its logit row alone (``"none"``, as the published methods explain a class)."""
    head = _classifier(network(model))
    if rule == "auto":
        rule = "predicted" if head is not None else "self"
    if rule == "self":
        what = ["own representation (centred)"] * len(reps)
        return Targets(reps - reps.mean(0), what, "self: <r(x), r(x) - mean r> (the image's own representation)")
    if rule not in TARGETS or contrast not in CONTRASTS:
        raise VitDecompError(f"unknown target {rule!r} or contrast {contrast!r}: {TARGETS}, {CONTRASTS}")
    if head is None:
        raise VitDecompError(f"--target {rule} needs a model with a linear classifier; use --target self")
    start, names, feature = _block(model, head, feature)
    rows = head.weight.detach()[start : start + len(names)].float()  # [V, D]
    bias = head.bias.detach()[start : start + len(names)].float() if head.bias is not None else 0.0
    p = torch.softmax(reps.float() @ rows.T + bias, -1)  # [N, V]
    value = p.argmax(1) if rule == "predicted" else _other_value(p.argmax(1), len(names), seed)
    name = f"feature {feature!r}" if feature else "all classes"
    what = [f"{feature}={names[int(v)]}" if feature else f"class {names[int(v)]}" for v in value]
    told = "the model's own top value" if rule == "predicted" else "a value the model does not predict (seeded)"
    if contrast == "none":
        return Targets(rows[value], what, f"{rule}: the logit of {told} ({name})")
    directions = rows[value] - alternatives(p, value) @ rows
    rule_text = f"{rule}: the logit of {told} ({name}) minus its expected alternative's (the model's softmax)"
    return Targets(directions, what, rule_text, ValueContext(rows, p, value))


def _other_value(pred: Tensor, n_values: int, seed: int) -> Tensor:
    """Per image a value other than ``pred [N]``, drawn uniformly with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (pred + torch.randint(1, max(n_values, 2), pred.shape, generator=g)) % n_values


def _block(model: object, head: torch.nn.Linear, feature: str) -> tuple[int, list[str], str | None]:
    """The logit block of ``feature`` (start, value names, feature) of a model with one block per
    attribute (:attr:`~vitdecomp.models.loaded.LoadedModel.attribute_heads`, the zoo's), or every
    class of another classifier (feature ``None``)."""
    from vitdecomp.world.attributes import ATTRIBUTES

    sizes: dict[str, int] = getattr(model, "attribute_heads", {})
    if not sizes or head.out_features != sum(sizes.values()):
        return 0, [str(i) for i in range(head.out_features)], None
    order = list(sizes)
    if feature not in order:
        raise VitDecompError(f"no logit block {feature!r} in this zoo model; blocks: {order}")
    return sum(sizes[k] for k in order[: order.index(feature)]), list(ATTRIBUTES[feature]), feature


# ---------------------------------------------------------------------------- running and scoring


@dataclass
class MethodScore:
    """One method's scores (``None`` where it does not apply: ``note`` says why) and its speed."""

    name: str
    metrics: SegMetrics | None
    maps_per_s: float | None
    note: str = ""


@dataclass
class SegmentResult(ResultBase):
    """What ``vitdecomp segment`` measured; ``section()`` is its part of the report, ``figures()`` the
    maps of a few images, ``files()`` the metric table as ``metrics.md``."""

    name: ClassVar[str] = "segment"

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
    figure_png: bytes | None = field(default=None, repr=False)
    resize: str = ""
    benchmark: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("figure_png")
        return d

    def figures(self) -> list[Figure]:
        png = self.figure_png
        return [] if png is None else [Figure("segment", png, "image, mask outline, each method's map")]

    def files(self) -> dict[str, bytes]:
        """``metrics.md``; on a published benchmark also ``benchmark.json`` (:meth:`benchmark_table`)."""
        files = {"metrics.md": self.markdown().encode()}
        if self.benchmark:
            files["benchmark.json"] = json.dumps(self.benchmark_table().to_dict(), indent=1).encode()
        return files

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The per-method metric table (header, formatted rows)."""
        header = ["method", "pixel acc.", "mIoU", "IoU object (cum. foreground)", "IoU background", "mAP"]
        header += ["mAP (object + background)", "pointing", "maps/s"]
        rows = []
        for m in self.methods:
            if m.metrics is None:
                rows.append([m.name, *["n/a"] * 7, "-"])
                continue
            s = m.metrics
            vals = [s.pixel_accuracy, s.miou, s.cumulative_foreground_iou, s.iou_background, s.mean_ap]
            two = "-" if s.mean_ap_two_class is None else f"{s.mean_ap_two_class:.3f}"
            rows.append([m.name, *(f"{v:.3f}" for v in vals), two, f"{s.pointing:.3f}", f"{m.maps_per_s:.1f}"])
        return header, rows

    def benchmark_table(self) -> BenchmarkTable:
        """This run's methods beside the published ImageNet-segmentation figures (mAP: the published
        protocol's, object + background; see :mod:`vitdecomp.apps.published`)."""
        settings = f"{self.resize}; {self.threshold}; explains: {self.target}"
        ours = [
            Row(THIS_RUN, METHOD_TITLES[m.name], self.model, self.images, settings, _benchmark_figures(m.metrics))
            for m in self.methods
            if m.metrics is not None
        ]
        notes = [
            "mIoU: the mean over object and background of the dataset-level IoU (Chefer et al.'s and TextSpan's "
            "code); the paper's 'mIoU' is the cumulative foreground IoU, in its own column.",
            "mAP: the published protocol's (per image, the normalised map ranks the object pixels and one minus it "
            "the background pixels, pooled; averaged over every image); this run's object-only mAP is mean_ap in "
            "segment.json.",
            "Rows with other data (the paper's 5,000-image subset) or other settings (resolution, threshold, what "
            "is explained) do not compare number for number.",
        ]
        if self.n_images < N_PUBLISHED:
            notes.append(f"This run read {self.n_images} images, not the benchmark's {N_PUBLISHED:,}.")
        title = "ImageNet-segmentation: this run beside the published figures"
        return BenchmarkTable(self.benchmark, title, SEGMENTATION_METRICS, ours, published_segmentation(), notes)

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
        figures = [f.for_section(picture=True) for f in self.figures()]  # images and maps: a JPEG
        notes = [f"target: {self.target}", f"decomposition layers: {self.layers}", f"threshold: {self.threshold}"]
        notes += [f"speed: {self.timing}"]
        if self.benchmark:
            notes.append(f"{self.benchmark}: the published figures beside these are in benchmark.json")
        notes += [f"{m.name}: {m.note}" for m in self.methods if m.note]
        if self.skipped:
            notes.append(f"{len(self.skipped)} image(s) skipped (no mask, or unreadable), e.g. {self.skipped[0]}")
        return AppSection("segment", "Zero-shot segmentation", summary, header, rows, figures, self.command, notes)


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
    pre = square_preprocess(model.preprocess) if data.square else model.preprocess
    out = []
    for s in range(0, len(data.names), batch):
        ims, mks = data.images[s : s + batch], data.masks[s : s + batch]
        geos = [input_geometry(pre, (im.height, im.width)) for im in ims]
        x = torch.stack([pre(im.convert("RGB")) for im in ims])
        masks = [to_input(m.astype(np.uint8) * 255, g, Image.NEAREST) > 0 for m, g in zip(mks, geos, strict=True)]
        shown = [to_input(np.asarray(im.convert("RGB")), g, Image.BILINEAR) for im, g in zip(ims, geos, strict=True)]
        out.append(_Batch(x, torch.from_numpy(np.stack(masks)), shown))
    return out


@dataclass(frozen=True)
class Explained:
    """What every map explains: the value (``target``, :data:`TARGETS`), the zoo models' logit block
    (``feature``), what it is read against (``contrast``, :data:`CONTRASTS`) and the ``seed`` of the
    ``wrong`` values (:func:`choose_targets`)."""

    target: str = "auto"
    feature: str = "color"
    contrast: str = "expected"
    seed: int = 0


def segment(
    model: object,
    data: SegmentSet,
    *,
    explained: Explained = Explained(),
    methods: list[RelevanceMap] | None = None,
    batch: int = SEGMENT_BATCH_SIZE,
    show: int = SEGMENT_SHOW,
    progress: bool = True,
) -> SegmentResult:
    """Every method's maps of ``data`` explaining the same per-image target, scored by the same metrics;
    maps per second timed side by side (methods alternate batch by batch). The maps run on the model's
    device; the scores are kept on the CPU."""
    methods = methods or default_methods()
    batches = _batches(model, data, batch)
    device = next(network(model).parameters(), torch.empty(0)).device
    reps = _representations(model, batches, device, progress)
    e = explained
    targets = choose_targets(model, reps, e.target, e.feature, e.contrast, e.seed)
    notes = {m.name: _applies(m, model) for m in methods}
    live = [m for m in methods if not notes[m.name]]
    run = _MethodRun({m.name: SegAccumulator() for m in live}, dict.fromkeys(notes, 0.0), {m.name: [] for m in live})
    start = 0
    desc = f"segment ({', '.join(m.name for m in live)})"
    with tqdm(total=len(data.names) * len(live), desc=desc, unit="map", disable=not progress) as bar:
        for i, b in enumerate(batches):
            u = targets.directions[start : start + len(b.x)].to(device)
            context = None if targets.context is None else targets.context.rows(start, start + len(b.x))
            start += len(b.x)
            for m in live[i % len(live) :] + live[: i % len(live)]:
                run.add(m, model, b, u, context, show)
                bar.update(len(b.x))  # every method's maps of every batch
    scores = [
        MethodScore(m.name, run.acc[m.name].result() if not notes[m.name] else None, None, notes[m.name])
        for m in methods
    ]
    for s in scores:
        s.maps_per_s = len(data.names) / run.seconds[s.name] if s.metrics is not None and run.seconds[s.name] else None
    shown = [im for b in batches for im in b.shown][:show]
    shown_masks = torch.cat([b.masks for b in batches])[:show]
    png = draw_grid(shown, shown_masks, {k: torch.cat(v) for k, v in run.kept.items()}, targets.what[:show])
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
        timing=timing_rule(),
        methods=scores,
        skipped=data.skipped,
        resized=data.resized,
        targets=counts,
        figure_png=png,
        resize=resize_rule(model, data.square),
        benchmark=data.benchmark,
    )


@torch.no_grad()
def _representations(model: object, batches: list[_Batch], device: torch.device, progress: bool) -> Tensor:
    """``[N, D]``: the images' representations (what the targets are chosen from), with a bar."""
    read = tqdm(batches, desc="segment: reading the images", unit="batch", leave=False, disable=not progress)
    return torch.cat([Representation(network(model))(b.x.to(device)).cpu() for b in read]).float()


def resize_rule(model: object, square: bool) -> str:
    """How the images and masks entered ``model``, in words."""
    h, w = input_size(model.preprocess)
    if square:
        return f"image and mask resized to {h} x {w}, no crop (masks nearest)"
    return f"the model's own resize / crop to {h} x {w} (masks carried through it, nearest)"


@dataclass
class _MethodRun:
    """Per method: its metric accumulator, its seconds, and the first maps kept for the figure."""

    acc: dict[str, SegAccumulator]
    seconds: dict[str, float]
    kept: dict[str, list[Tensor]]

    def add(self, m: RelevanceMap, model: object, b: _Batch, u: Tensor, ctx: ValueContext | None, show: int) -> None:
        """One batch of method ``m``'s maps, timed, scored against the masks, the first ``show`` kept."""
        t0 = time.perf_counter()
        maps = m(model, b.x.to(u.device), u, context=ctx).detach().float().cpu()
        self.seconds[m.name] += time.perf_counter() - t0
        self.acc[m.name].add(maps, b.masks)
        if sum(len(k) for k in self.kept[m.name]) < show:
            self.kept[m.name].append(maps[: show - sum(len(k) for k in self.kept[m.name])])


def draw_grid(images: list[np.ndarray], masks: Tensor, maps: dict[str, Tensor], what: list[str]) -> bytes:
    """A PNG: one row per image — the image with the mask outline, then each method's map (min-max
    normalised, mask outline in cyan, the thresholded region hatched)."""
    plt = pyplot()
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
    return figure_png(fig)


# ---------------------------------------------------------------------------- the application

#: The relevance-map methods by name, in the order they are compared.
METHODS = ("decomposition", "gradcam", "chefer")
#: Their names in a benchmark table.
METHOD_TITLES = {
    "decomposition": "decomposition (every head's token contributions)",
    "gradcam": "GradCAM (pytorch-grad-cam)",
    "chefer": "Chefer et al. (gradient-weighted rollout)",
}


def _benchmark_figures(m: SegMetrics) -> dict[str, float | None]:
    """A method's figures under the published protocol's names (mAP: object + background)."""
    return {
        "pixel_accuracy": m.pixel_accuracy,
        "miou": m.miou,
        "mean_ap": m.mean_ap_two_class,
        "cumulative_foreground_iou": m.cumulative_foreground_iou,
    }


@dataclass(kw_only=True)
class SegmentConfig:
    """Options of ``vitdecomp segment``: the model (``checkpoint``, ``device``), the images and masks
    (``world``: a world export folder; or ``images`` with ``masks``; or ``mat``: ImageNet-segmentation's
    ``gtsegs_ijcv.mat``; none: ``n_images`` generated scenes from ``seed``; at most ``n_images`` in any
    case; ``skip_bad_images``: skip unreadable files), how they enter the model (``resize``:
    :data:`RESIZES`), what every map explains (``target``, ``feature``, ``contrast``: :class:`Explained`,
    the ``wrong`` values drawn with ``seed``), the ``methods`` compared, images per batch, images in the
    figure, and the folder the command writes to."""

    model: str = MODEL
    checkpoint: str | Path | None = None
    device: str | None = "cpu"
    world: str | Path | None = None
    images: str | Path | None = None
    masks: str | Path | None = None
    mat: str | Path | None = None
    resize: str = "auto"
    n_images: int | None = None
    skip_bad_images: bool = False
    seed: int = SHOW_SEED
    target: str = "auto"
    feature: str = "color"
    contrast: str = "expected"
    methods: tuple[str, ...] = METHODS
    batch_size: int = SEGMENT_BATCH_SIZE
    show: int = SEGMENT_SHOW
    progress: bool = True
    out: str | Path = SEGMENT_OUT

    def command(self) -> str:
        """The command line that reproduces this run (options that matter, defaults spelled out)."""
        parts = ["vitdecomp", "segment", "--model", self.model]
        for flag in ("checkpoint", "world", "images", "masks", "mat", "n_images"):
            if getattr(self, flag) is not None:
                parts += [f"--{flag.replace('_', '-')}", str(getattr(self, flag))]
        if self.world is None and self.images is None and self.mat is None:
            parts += ["--seed", str(self.seed)]
        if self.resize != "auto":
            parts += ["--resize", self.resize]
        parts += ["--target", self.target, "--feature", self.feature, "--contrast", self.contrast]
        parts += ["--methods", ",".join(self.methods)]
        return shlex.join(parts)


class Segment(ModelApplication[SegmentConfig, SegmentResult]):
    """``vitdecomp segment``: every relevance-map method on the same images and targets, scored on masks."""

    name = "segment"

    def check(self, cfg: SegmentConfig) -> None:
        for name, least in (("n_images", 1), ("batch_size", 1), ("show", 0), ("seed", 0)):
            check_at_least("--" + name.replace("_", "-"), getattr(cfg, name), least)
        unknown = [w for w in cfg.methods if w not in METHODS]
        if unknown or not cfg.methods:
            raise VitDecompError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        if cfg.target not in TARGETS or cfg.contrast not in CONTRASTS:
            raise VitDecompError(f"--target: one of {', '.join(TARGETS)}; --contrast: one of {', '.join(CONTRASTS)}")
        if cfg.resize not in RESIZES:
            raise VitDecompError(f"unknown --resize {cfg.resize!r}: choose from {', '.join(RESIZES)}")
        given = [f"--{k}" for k in ("world", "images", "masks", "mat") if getattr(cfg, k) is not None]
        if cfg.mat is not None and len(given) > 1:
            raise VitDecompError(f"give one image source, not {' and '.join(given)}")

    def data(self, cfg: SegmentConfig) -> SegmentSet:
        data = self._source(cfg)
        if cfg.resize != "auto":
            data.square = cfg.resize == "square"
        return data

    def _source(self, cfg: SegmentConfig) -> SegmentSet:
        if cfg.mat is not None:
            return read_mat(cfg.mat, cfg.n_images)
        if cfg.world is not None:
            if cfg.images is not None or cfg.masks is not None:
                raise VitDecompError("give --world DIR, or --images DIR with --masks DIR, not both")
            return folder_set(cfg.world, Path(cfg.world) / "masks", cfg.n_images, cfg.skip_bad_images)
        if (cfg.images is None) != (cfg.masks is None):
            raise VitDecompError("--images and --masks go together (masks matched to images by file stem)")
        if cfg.images is not None:
            return folder_set(cfg.images, cfg.masks, cfg.n_images, cfg.skip_bad_images)  # type: ignore[arg-type]
        return world_set(cfg.n_images or N_WORLD_IMAGES, cfg.seed)

    def measure(self, cfg: SegmentConfig, model: LoadedModel, data: SegmentSet) -> SegmentResult:
        maps = {m.name: m for m in default_methods()}
        result = segment(
            model,
            data,
            explained=Explained(cfg.target, cfg.feature, cfg.contrast, cfg.seed),
            methods=[maps[w] for w in cfg.methods],
            batch=cfg.batch_size,
            show=cfg.show,
            progress=cfg.progress,
        )
        result.command = cfg.command()
        return result
