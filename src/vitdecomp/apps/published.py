"""The published figures a benchmark run is put beside, with the settings they were measured under, and
the table that holds both (:class:`BenchmarkTable`: printed by the command, written as
``benchmark.json``, one flat row per line so that ``pandas.DataFrame(doc["rows"])`` is the table).

Every figure is a fraction (a published 75.21 % is 0.7521); ``None`` where a source does not report
it. Sources: the NeurIPS 2024 paper (METHOD.md §5: its own 5,000-image mask set, where "mIoU" is a
cumulative foreground IoU, and its own Waterbirds split), TextSpan (Gandelsman et al., ICLR 2024),
Chefer et al. (CVPR 2021), a third-party evaluation of LeGrad, and the trained Waterbirds references
(ANCHORS.md). A figure measured on other data or under another protocol says so in ``data`` and
``settings``: only rows with the same data and settings compare number for number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The segmentation figures, in the order printed: keys of :attr:`Row.figures`.
SEGMENTATION_METRICS = ("pixel_accuracy", "miou", "mean_ap", "cumulative_foreground_iou")
#: The Waterbirds figures (test split): worst group and average, before and after.
WATERBIRDS_METRICS = ("worst_group_before", "worst_group", "average_before", "average")
HEADERS = {
    "pixel_accuracy": "pixel acc.",
    "miou": "mIoU",
    "mean_ap": "mAP",
    "cumulative_foreground_iou": "cum. foreground IoU",
    "worst_group_before": "worst group before",
    "worst_group": "worst group",
    "average_before": "average before",
    "average": "average",
}
THIS_RUN = "this run (vitdecomp)"


@dataclass(frozen=True)
class Row:
    """One line of a benchmark table: who measured it (``source``), the ``method``, the ``model``,
    the ``data`` and the ``settings`` (resolution, threshold, what is explained or the protocol), and
    its ``figures`` (fractions; a missing key or ``None``: not reported)."""

    source: str
    method: str
    model: str
    data: str
    settings: str
    figures: dict[str, float | None] = field(default_factory=dict)


def _seg(source: str, method: str, model: str, data: str, settings: str, *values: float | None) -> Row:
    return Row(source, method, model, data, settings, dict(zip(SEGMENTATION_METRICS, values, strict=False)))


GTSEGS = "ImageNet-segmentation, gtsegs_ijcv.mat (4,276 images)"
TEXTSPAN = "TextSpan (Gandelsman et al., ICLR 2024)"
TEXTSPAN_MODEL = "CLIP ViT (open_clip ViT-H-14 laion2b_s32b_b79k in its released script)"
TEXTSPAN_SETTINGS = (
    "224 px (model's resize + centre crop; masks resized to 224 x 224, nearest); map clipped at 0, min-max "
    "normalised, object > its mean; explains the zero-shot predicted class minus the mean over classes"
)
CHEFER_SETTINGS = (
    "224 x 224 (image and mask resized, no crop); min-max normalised, object > its mean; explains the predicted class"
)
LEGRAD_SETTINGS = "448 px; object where the [0, 1] map > 0.5; explains the text 'a photo of a <class>.'"
PAPER = "NeurIPS 2024 paper (METHOD.md §5)"
PAPER_SEG_DATA = "its own 5,000-image ImageNet mask subset (not gtsegs_ijcv.mat)"
PAPER_SEG_SETTINGS = "224 px; its 'mIoU' is a cumulative foreground IoU (in that column here); explains the true class"
TIMM_MODELS = {
    "DeiT": "timm deit_base_patch16_224",
    "DINO": "timm vit_base_patch16_224.dino",
    "DINOv2": "timm vit_base_patch14_dinov2.lvd142m (518 px)",
    "Swin": "timm swin_base_patch4_window7_224",
    "MaxViT": "timm maxvit_small_tf_224",
    "CLIP": "open_clip ViT-B-16 laion2b_s34b_b88k",
}


def _paper_segmentation() -> list[Row]:
    """The paper's table: pixel acc. / cumulative foreground IoU (its "mIoU") / mAP per model and method."""
    figures = {
        "DeiT": ((0.772, 0.529, 0.831), (0.653, 0.463, 0.713), (0.731, 0.479, 0.787)),
        "DINO": ((0.758, 0.486, 0.811), (0.705, 0.431, 0.748), (0.731, 0.454, 0.808)),
        "MaxViT": ((0.716, 0.424, 0.724), (0.473, 0.171, 0.424), None),
        "Swin": ((0.714, 0.434, 0.762), (0.597, 0.236, 0.537), None),
    }
    rows = []
    for model, per_method in figures.items():
        for method, vals in zip(("decomposition", "GradCAM", "Chefer et al."), per_method, strict=True):
            if vals is not None:
                acc, cum_iou, ap = vals
                figs = {"pixel_accuracy": acc, "cumulative_foreground_iou": cum_iou, "mean_ap": ap}
                rows.append(Row(PAPER, method, TIMM_MODELS[model], PAPER_SEG_DATA, PAPER_SEG_SETTINGS, figs))
    return rows


def published_segmentation() -> list[Row]:
    """Every published ImageNet-segmentation figure of ANCHORS.md and METHOD.md §5, with its settings."""
    textspan = [
        ("LRP", 0.5281, 0.3357, 0.5437),
        ("partial-LRP", 0.6149, 0.4071, 0.7229),
        ("rollout", 0.6063, 0.4064, 0.7447),
        ("raw attention", 0.6567, 0.4383, 0.7605),
        ("GradCAM", 0.7027, 0.4450, 0.7030),
        ("Chefer et al.", 0.6921, 0.4747, 0.7829),
        ("TextSpan (decomposition)", 0.7521, 0.5450, 0.8161),
    ]
    rows = [_seg(TEXTSPAN, m, TEXTSPAN_MODEL, GTSEGS, TEXTSPAN_SETTINGS, *v) for m, *v in textspan]
    chefer = "Chefer et al. (CVPR 2021), as re-quoted"
    rows.append(_seg(chefer, "Chefer et al.", "supervised ViT-B/16", GTSEGS, CHEFER_SETTINGS, 0.7970, 0.6195, 0.8603))
    legrad = "LeGrad, third-party evaluation"
    clip, siglip = "open_clip ViT-B-16 laion2b_s34b_b88k", "SigLIP ViT-B/16"
    rows.append(_seg(legrad, "LeGrad", clip, GTSEGS, LEGRAD_SETTINGS, 0.7752, 0.5866, 0.8249))
    rows.append(_seg(legrad, "LeGrad", siglip, GTSEGS, LEGRAD_SETTINGS, 0.7164, 0.4105, 0.7895))
    return rows + _paper_segmentation()


def _wb(source: str, method: str, model: str, data: str, settings: str, *values: float | None) -> Row:
    return Row(source, method, model, data, settings, dict(zip(WATERBIRDS_METRICS, values, strict=False)))


WATERBIRDS = "Waterbirds, official split (train 4,795 / val 1,199 / test 5,794), test"
PAPER_WB_DATA = "its own Waterbirds split (train correlation 0.9, uncorrelated test)"
PAPER_WB_SETTINGS = (
    "linear head on the representation; mean-ablate the top 10 components by score(spurious) - score(core) "
    "(k fixed by hand)"
)


def published_waterbirds() -> list[Row]:
    """Every published Waterbirds figure of ANCHORS.md and METHOD.md §5, with its settings."""
    paper = {
        "DeiT": (0.733, 0.815, 0.874, 0.913),
        "CLIP": (0.507, 0.744, 0.727, 0.790),
        "DINO": (0.800, 0.911, 0.900, 0.938),
        "DINOv2": (0.967, 0.978, 0.983, 0.986),
        "Swin": (0.834, 0.871, 0.927, 0.944),
        "MaxViT": (0.777, 0.814, 0.875, 0.887),
    }
    rows = [
        _wb(PAPER, "mean-ablate top-k components", TIMM_MODELS[m], PAPER_WB_DATA, PAPER_WB_SETTINGS, *v)
        for m, v in paper.items()
    ]
    textspan = "zero-shot CLIP; mean-ablate the heads TextSpan's descriptions tie to the spurious cue"
    for model, before, after in (("ViT-B-16", 0.456, 0.575), ("ViT-L-14", 0.477, 0.729), ("ViT-H-14", 0.372, 0.433)):
        rows.append(_wb(TEXTSPAN, "head ablation", f"CLIP {model}", WATERBIRDS, textspan, before, after))
    text = "zero-shot CLIP; project the spurious text directions out (training-free)"
    figs = {"worst_group_before": 0.364, "worst_group": 0.453}
    rows.append(
        Row("text-based debiasing (ANCHORS.md)", "orthogonal projection", "CLIP ViT-L/14", WATERBIRDS, text, figs)
    )
    trained = "ResNet-50 trained on Waterbirds (worst group only)"
    references = (("ERM", 0.726), ("JTT", 0.867), ("Group DRO", 0.914), ("DFR (last layer, balanced data)", 0.929))
    for method, worst in references:
        rows.append(_wb("trained references (ANCHORS.md)", method, "ResNet-50", WATERBIRDS, trained, None, worst))
    return rows


@dataclass
class BenchmarkTable:
    """This run's rows beside the published ones, for one benchmark (``imagenet-segmentation`` or
    ``waterbirds``); ``metrics`` the figure columns; ``notes`` what differs between the rows."""

    benchmark: str
    title: str
    metrics: tuple[str, ...]
    ours: list[Row]
    published: list[Row]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``benchmark.json``: one flat record per row (``ours`` true for this run's), every metric a
        column (``None``: not reported), so that a results table is ``DataFrame(doc["rows"])``."""
        rows = [self._record(r, True) for r in self.ours] + [self._record(r, False) for r in self.published]
        return {
            "benchmark": self.benchmark,
            "title": self.title,
            "metrics": list(self.metrics),
            "rows": rows,
            "notes": self.notes,
        }

    def _record(self, row: Row, ours: bool) -> dict[str, Any]:
        head = {"ours": ours, "source": row.source, "method": row.method, "model": row.model}
        tail = {"data": row.data, "settings": row.settings}
        return head | {m: row.figures.get(m) for m in self.metrics} | tail

    def markdown(self) -> str:
        """The table as Markdown (figures in percent, two decimals; ``-``: not reported); each row's data
        and settings as a numbered note under it (rows that share them share the number), then the notes."""
        cols = ["source", "method", "model", *(HEADERS[m] for m in self.metrics), "data, settings"]
        lines = [self.title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        keys: dict[tuple[str, str], int] = {}
        for row in [*self.ours, *self.published]:
            key = keys.setdefault((row.data, row.settings), len(keys) + 1)
            figures = [_percent(row.figures.get(m)) for m in self.metrics]
            lines.append("| " + " | ".join([row.source, row.method, row.model, *figures, f"[{key}]"]) + " |")
        lines += ["", *(f"[{k}] {data}; {settings}" for (data, settings), k in keys.items())]
        return "\n".join([*lines, "", *(f"* {n}" for n in self.notes)]).rstrip("\n") + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
