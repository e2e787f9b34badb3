"""Removing a spurious feature by mean-ablating the components that carry it (``vitdecomp debias``).

Waterbirds' recipe (Sagawa et al. 2020; the paper's section 5): a label ``y`` spuriously tied to a
``place`` in the training split, balanced groups in validation and test. On the frozen
representation ``z`` of the training images a linear head is fitted (:class:`LinearHead`). The
components are ranked by ``score(spurious) - score(core)`` over the training images, with the
feature set's two features (:data:`WORLD_FEATURES` on a world export, the shipped ``"waterbirds"``
set otherwise, or a JSON file). The score is ``--score``, by default ``auto``: every score of
:mod:`vitdecomp.scores` is tried and the one whose validation curve is best at its chosen ``k`` is kept
(:func:`choose_score`). The top ``k`` are mean-ablated (:class:`~vitdecomp.apps.mean_ablation.MeanAblation`,
means over the training split) and the same head reads the ablated representation.

**Choice of k** (:func:`choose_k`, validation only): every ``k`` from 0 (no ablation) to ``C``
(every component) is evaluated on the validation split; ``k`` is the one with the highest validation
worst-group accuracy, ties broken by the higher validation average, then the smaller ``k``. The test
split is read only after ``k`` is fixed (its curve is drawn, never used).

In the same run: two controls at the chosen ``k`` — ``k`` random components (``n_random`` draws)
and the top ``k`` by ``score(core)`` — and two baselines: for a CLIP subject (whose representation
lives in the text space), the training-free projection of the spurious feature's text span out of
the representation read by the same head; and DFR (the head refitted on the group-balanced
validation split, :func:`~vitdecomp.apps.classifiers.dfr_head`), a trained upper bound.

``vitdecomp debias --images DIR [--metadata DIR/metadata.csv] [--model M] [--clip C] [--out DIR]``
writes ``debias.json``, ``debias.png`` (the k curve) and ``debias.section.json`` (the report's
:class:`~vitdecomp.results.AppSection`). On the official Waterbirds folder (its ``metadata.csv`` has
every column of :data:`OFFICIAL_COLUMNS`) the result also holds the published figures beside its own
(:meth:`DebiasResult.benchmark_table`, ``benchmark.json``).
"""

from __future__ import annotations

import csv
import functools
import json
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vitdecomp.apps.classifiers import AveragedHead, GroupAccuracy, LinearHead, dfr_head, project_out
from vitdecomp.apps.contract import AnalysedConfig, ComponentApplication
from vitdecomp.apps.mean_ablation import AnalysedComponents, MeanAblation
from vitdecomp.apps.published import THIS_RUN, WATERBIRDS_METRICS, BenchmarkTable, Row, published_waterbirds
from vitdecomp.checks import check_at_least
from vitdecomp.defaults import ALIGN_STEPS, DEBIAS_OUT, N_RANDOM, READER
from vitdecomp.errors import UsageError
from vitdecomp.figures import figure_png, pyplot
from vitdecomp.imageset import ImageSource, display_name
from vitdecomp.results import AppSection, Figure, ResultBase
from vitdecomp.scores import DEFAULT_SCORE, load_features, score_names
from vitdecomp.world.waterbirds import PLACES, SPLIT_NAMES, WATERBIRD_SHAPES

#: The built-in world's Waterbirds features: the places' backgrounds (spurious) and the two label
#: families' shapes (core).
WORLD_FEATURES: dict[str, list[str]] = {
    "spurious": [*PLACES[0], *PLACES[1]],
    "core": [*WATERBIRD_SHAPES[0], *WATERBIRD_SHAPES[1]],
}
METADATA_COLUMNS = ("img_filename", "y", "split", "place")
#: The columns of the official Waterbirds ``metadata.csv`` (Sagawa et al.'s
#: ``waterbird_complete95_forest2water2``): a file with all of them is that benchmark.
OFFICIAL_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
#: The benchmark such a run is (the name its published figures are filed under).
BENCHMARK = "waterbirds"
#: The official split's sizes (train, val, test).
OFFICIAL_SIZES = {"train": 4795, "val": 1199, "test": 5794}
TRAIN, VAL, TEST = 0, 1, 2
#: How k is chosen (:func:`choose_k`), as the outputs state it.
K_RULE = (
    "k (0..C) maximises validation worst-group accuracy, ties broken by the higher validation average, "
    "then the smaller k; the test split is read only after k is fixed"
)


# ----------------------------------------------------------------------------------------------
# metadata


@dataclass
class Metadata:
    """A Waterbirds-layout ``metadata.csv``: per listed image its file (relative to the images
    folder), label ``y`` (0/1), ``split`` (0 train / 1 val / 2 test) and ``place`` (0/1);
    ``official``: the file has every column of the official Waterbirds file (:data:`OFFICIAL_COLUMNS`)."""

    files: list[str]
    y: np.ndarray
    split: np.ndarray
    place: np.ndarray
    official: bool = False

    def rows(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def only(self, files: set[str]) -> Metadata:
        """The images of ``files`` only (those left after skipping unreadable ones)."""
        keep = np.asarray([f in files for f in self.files], dtype=bool)
        kept = [f for f, k in zip(self.files, keep, strict=True) if k]
        return Metadata(kept, self.y[keep], self.split[keep], self.place[keep], self.official)

    @property
    def group(self) -> np.ndarray:
        return 2 * self.y + self.place


def read_metadata(path: str | Path) -> Metadata:
    """Read and check ``metadata.csv``; every problem is one :class:`UsageError` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no metadata file {display_name(path)} (give --metadata, Waterbirds layout)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            table = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{display_name(path)}: not a readable CSV ({err})") from err
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{display_name(path)}: missing column(s) {', '.join(missing)} (needs {METADATA_COLUMNS})")
    if not table:
        raise UsageError(f"{display_name(path)}: no rows")
    codes = {"y": (0, 1), "split": (0, 1, 2), "place": (0, 1)}
    arrays = {}
    for name, allowed in codes.items():
        try:
            values = np.asarray([int(r[name]) for r in table])
        except (TypeError, ValueError):
            bad = next(i for i, r in enumerate(table) if not str(r[name] or "").strip().lstrip("-").isdigit())
            raise UsageError(
                f"{display_name(path)} row {bad + 2}: {name}={table[bad][name]!r} is not an integer"
            ) from None
        wrong = np.flatnonzero(~np.isin(values, allowed))
        if wrong.size:
            raise UsageError(
                f"{display_name(path)} row {wrong[0] + 2}: {name}={values[wrong[0]]} (allowed: {list(allowed)})"
            )
        arrays[name] = values
    official = set(OFFICIAL_COLUMNS) <= set(header)
    meta = Metadata([r["img_filename"] for r in table], arrays["y"], arrays["split"], arrays["place"], official)
    check_groups(meta, path)
    return meta


def check_groups(meta: Metadata, path: str | Path) -> None:
    """Training needs both labels; validation and test need images of all four ``(y, place)`` groups."""
    name = display_name(path)
    for split in (TRAIN, VAL, TEST):
        if not (meta.split == split).any():
            raise UsageError(f"{name}: no images in the {SPLIT_NAMES[split]} split (split={split})")
    train = meta.rows(TRAIN)
    if len(np.unique(meta.y[train])) < 2:
        raise UsageError(f"{name}: the train split has only y={meta.y[train][0]}; it needs both labels")
    for split in (VAL, TEST):
        rows = meta.rows(split)
        for g in range(4):
            if not (meta.group[rows] == g).any():
                raise UsageError(
                    f"{name}: the {SPLIT_NAMES[split]} split has no image with y={g // 2}, place={g % 2}; "
                    "worst-group accuracy needs all four groups"
                )


def rows_in_source(meta: Metadata, source: ImageSource, path: str | Path) -> np.ndarray:
    """The source rows of the metadata's images, in the metadata's order (missing files named)."""
    where = {i: r for r, i in enumerate(source.ids)}
    lost = [f for f in meta.files if f not in where]
    if lost:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        raise UsageError(
            f"{display_name(path)} lists {len(lost)} image(s) not found under the images folder: "
            + ", ".join(lost[:3])
            + more
        )
    return np.asarray([where[f] for f in meta.files])


# ----------------------------------------------------------------------------------------------
# the method on arrays


@dataclass
class Reading:
    """One way of reading the validation and test images: its name, ``k`` and components, and the
    group accuracies (``test_draws``: per random draw, for the random control)."""

    name: str
    val: GroupAccuracy
    test: GroupAccuracy
    k: int = 0
    components: list[str] = field(default_factory=list)
    test_draws: list[GroupAccuracy] = field(default_factory=list)


@dataclass
class CurvePoint:
    k: int
    val: GroupAccuracy
    test: GroupAccuracy


def choose_k(val: list[GroupAccuracy]) -> int:
    """The documented rule: the ``k`` (index into ``val``, the validation accuracies for
    ``k = 0, 1, ...``) with the highest worst-group accuracy, then the highest average, then the
    smallest ``k``. Only validation figures go in."""
    return min(range(len(val)), key=lambda k: (-val[k].worst, -val[k].average, k))


#: ``--score auto``: the score is chosen on validation too (:func:`choose_score`).
AUTO = "auto"


def choose_score(ablation: MeanAblation, split: Split, scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """``--score auto``: the method (``scores``: ``{method: (spurious [C], core [C])}``) whose
    validation curve is best at its own chosen ``k`` — highest validation worst-group accuracy, then
    average; a tie goes to the method listed first. Only validation figures go in."""
    head = LinearHead.fit(ablation.whole(split.rows[TRAIN]), split.y[TRAIN])
    best: tuple[tuple[float, float], str] | None = None
    for method, (spurious, core) in scores.items():
        order = torch.argsort(spurious - core, descending=True, stable=True).tolist()
        ks = list(range(ablation.n_components + 1))
        val = [split.accuracy(head, z, VAL) for z in ablation.prefixes(order, ks, split.rows[VAL])]
        k = choose_k(val)
        if best is None or (val[k].worst, val[k].average) > best[0]:
            best = ((val[k].worst, val[k].average), method)
    assert best is not None, "no score to choose from"
    return best[1]


@dataclass
class Split:
    """Rows (into the ablation's images) and labels of the three splits."""

    rows: dict[int, np.ndarray]
    y: dict[int, np.ndarray]
    place: dict[int, np.ndarray]

    @classmethod
    def of(cls, meta: Metadata, source_rows: np.ndarray) -> Split:
        sel = {s: meta.rows(s) for s in (TRAIN, VAL, TEST)}
        return cls(
            {s: source_rows[i] for s, i in sel.items()},
            {s: meta.y[i] for s, i in sel.items()},
            {s: meta.place[i] for s, i in sel.items()},
        )

    def accuracy(self, head: LinearHead | AveragedHead, z: torch.Tensor, split: int) -> GroupAccuracy:
        return GroupAccuracy.of(head.predict(z), self.y[split], self.place[split])


def debias_arrays(
    ablation: MeanAblation,
    split: Split,
    spurious: torch.Tensor,
    core: torch.Tensor,
    *,
    spurious_text: torch.Tensor | None = None,
    n_random: int = 5,
    seed: int = 0,
) -> tuple[list[Reading], list[CurvePoint]]:
    """The method and its controls and baselines, given every component's ``spurious`` and ``core``
    scores ``[C]``; ``ablation``'s means must come from the training rows. ``spurious_text [T, D]``
    (only for a representation in the text space) adds the projection baseline. Returns the readings
    (head, ablated, random, core, [projection], DFR) and the k curve."""
    head = LinearHead.fit(ablation.whole(split.rows[TRAIN]), split.y[TRAIN])
    order = torch.argsort(spurious - core, descending=True, stable=True).tolist()
    ks = list(range(ablation.n_components + 1))
    val_curve = [split.accuracy(head, z, VAL) for z in ablation.prefixes(order, ks, split.rows[VAL])]
    k = choose_k(val_curve)
    test_curve = [split.accuracy(head, z, TEST) for z in ablation.prefixes(order, ks, split.rows[TEST])]
    curve = [CurvePoint(i, v, t) for i, v, t in zip(ks, val_curve, test_curve, strict=True)]

    def read(name: str, comps: list[int]) -> Reading:
        zs = [ablation.ablate(comps, split.rows[s]) for s in (VAL, TEST)]
        names = [ablation.labels[i] for i in comps]
        return Reading(name, split.accuracy(head, zs[0], VAL), split.accuracy(head, zs[1], TEST), len(comps), names)

    readings = [read("linear head", []), read("ablate top k by score(spurious) - score(core)", order[:k])]
    rng = np.random.default_rng(seed)
    draws = [read("", sorted(rng.choice(ablation.n_components, k, replace=False).tolist())) for _ in range(n_random)]
    readings.append(_pooled(f"ablate k random components ({n_random} draws)", draws, k))
    core_order = torch.argsort(core, descending=True, stable=True).tolist()
    readings.append(read("ablate top k by score(core)", core_order[:k]))
    if spurious_text is not None:
        zs = [project_out(ablation.whole(split.rows[s]), spurious_text) for s in (VAL, TEST)]
        readings.append(
            Reading(
                "project the spurious texts out (training-free)",
                split.accuracy(head, zs[0], VAL),
                split.accuracy(head, zs[1], TEST),
            )
        )
    dfr = dfr_head(ablation.whole(split.rows[VAL]), split.y[VAL], 2 * split.y[VAL] + split.place[VAL], seed=seed)
    val, test = (split.accuracy(dfr, ablation.whole(split.rows[s]), s) for s in (VAL, TEST))
    readings.append(Reading("DFR: head refitted on balanced val (upper bound)", val, test))
    return readings, curve


def _pooled(name: str, draws: list[Reading], k: int) -> Reading:
    """The mean over random draws (group by group), keeping each draw's test accuracies."""

    def mean(accs: list[GroupAccuracy]) -> GroupAccuracy:
        groups = {g: float(np.mean([a.groups[g] for a in accs])) for g in accs[0].groups}
        return GroupAccuracy(groups, float(np.mean([a.worst for a in accs])), float(np.mean([a.average for a in accs])))

    if not draws:
        nan = GroupAccuracy({}, float("nan"), float("nan"))
        return Reading(name, nan, nan, k)
    return Reading(
        name, mean([d.val for d in draws]), mean([d.test for d in draws]), k, test_draws=[d.test for d in draws]
    )


# ----------------------------------------------------------------------------------------------
# the application


@dataclass(kw_only=True)
class DebiasConfig(AnalysedConfig):
    """Options of ``vitdecomp debias``: the image folder and its ``metadata.csv`` (default
    ``images/metadata.csv``), the feature set (``None``: the built-in one for the folder), the score
    that ranks the components (``auto``: chosen on validation), the random control's draws and the
    seed of the control and of DFR's subsamples; the rest as :class:`AnalysedConfig`."""

    images: str | Path
    metadata: str | Path | None = None
    features: str | Path | None = None
    score: str = AUTO
    n_random: int = N_RANDOM
    seed: int = 0
    out: str | Path = DEBIAS_OUT

    def command(self) -> str:
        """The command line that reproduces this run (options left at their defaults omitted)."""
        flags = {"--metadata": self.metadata, "--features": self.features, "--checkpoint": self.checkpoint}
        flags |= {"--clip": self.reader if self.reader != READER else None}
        flags |= {"--clip-checkpoint": self.reader_checkpoint}
        flags |= {"--score": self.score if self.score != AUTO else None}
        flags |= {"--align-steps": self.align_steps if self.align_steps != ALIGN_STEPS else None}
        opts = [f"{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
        return " ".join(["vitdecomp debias --images", shlex.quote(str(self.images)), "--model", self.model, *opts])

    @property
    def metadata_path(self) -> Path:
        return Path(self.metadata) if self.metadata is not None else Path(self.images) / "metadata.csv"


@dataclass
class DebiasResult(ResultBase):
    """Everything ``debias.json`` holds; :meth:`section` is the report's view of it, :meth:`figures`
    the k curve."""

    name: ClassVar[str] = "debias"

    model: str
    images: str
    corr: float | None
    score: str
    features: dict[str, list[str]]
    n_images: dict[str, int]
    k: int
    rule: str
    readings: list[Reading]
    curve: list[CurvePoint]
    ranking: list[tuple[str, float]]
    command: str = ""
    benchmark: str = ""

    def reading(self, prefix: str) -> Reading:
        return next(r for r in self.readings if r.name.startswith(prefix))

    @property
    def before(self) -> Reading:
        return self.readings[0]

    @property
    def after(self) -> Reading:
        return self.readings[1]

    @property
    def gap_closed(self) -> float | None:
        """Share of the test worst-group gap between the head and DFR that the ablation closed."""
        dfr = self.reading("DFR").test.worst
        gap = dfr - self.before.test.worst
        return None if gap <= 0 else (self.after.test.worst - self.before.test.worst) / gap

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gap_closed"] = self.gap_closed
        return d

    def figures(self) -> list[Figure]:
        return [
            Figure("debias", self._curve_png, "Worst-group and average accuracy against k (k chosen on validation).")
        ]

    def files(self) -> dict[str, bytes]:
        """On the official Waterbirds folder: ``benchmark.json`` (:meth:`benchmark_table`)."""
        return (
            {"benchmark.json": json.dumps(self.benchmark_table().to_dict(), indent=1).encode()}
            if self.benchmark
            else {}
        )

    def benchmark_table(self) -> BenchmarkTable:
        """Every reading of this run (test split; "before": the linear head) beside the published
        Waterbirds figures (:mod:`vitdecomp.apps.published`)."""
        head = self.before.test
        settings = f"linear head on the representation; score {self.score}; k = {self.k} chosen on validation"
        data = f"{self.images} ({_sizes(self.n_images)}), test"
        ours = []
        for r in self.readings:
            figs = dict(zip(WATERBIRDS_METRICS, (head.worst, r.test.worst, head.average, r.test.average), strict=True))
            ours.append(Row(THIS_RUN, r.name + (f", k = {r.k}" if r.k else ""), self.model, data, settings, figs))
        notes = [
            "Before: the linear head on the whole representation; after: the reading named in the method column.",
            "The paper's rows use its own split and k = 10 fixed by hand; TextSpan's and the text projection are "
            "zero-shot CLIP; the trained references are ResNet-50s trained on Waterbirds. Only this run's rows "
            "share this run's split and head.",
        ]
        if self.n_images != OFFICIAL_SIZES:
            notes.append(
                f"This run's split ({_sizes(self.n_images)}) is not the official one ({_sizes(OFFICIAL_SIZES)})."
            )
        title = "Waterbirds: this run beside the published figures"
        return BenchmarkTable(self.benchmark, title, WATERBIRDS_METRICS, ours, published_waterbirds(), notes)

    @functools.cached_property
    def _curve_png(self) -> bytes:
        return draw_curve(self)

    def section(self) -> AppSection:
        """The report's section: test figures of every reading, the k curve, the command."""
        b, a = self.before.test, self.after.test
        gap = self.gap_closed
        summary = (
            f"Mean-ablating the {self.k} components with the highest score(spurious) - score(core) moves "
            f"test worst-group accuracy {b.worst:.3f} -> {a.worst:.3f} and average {b.average:.3f} -> {a.average:.3f}"
            + (f" ({gap:.0%} of the gap to DFR closed)." if gap is not None else ".")
        )
        groups = list(b.groups)
        rows = [
            [
                r.name,
                str(r.k) if r.components or r.k else "-",
                f"{r.test.worst:.3f}",
                f"{r.test.average:.3f}",
                *(f"{r.test.groups.get(g, float('nan')):.3f}" for g in groups),
            ]
            for r in self.readings
        ]
        notes = [
            self.rule,
            f"Images: {self.n_images}; corr {self.corr}; {self.score} score; features {json.dumps(self.features)}.",
            "Top components: " + ", ".join(f"{lab} {v:+.3f}" for lab, v in self.ranking[: max(self.k, 5)]),
        ]
        if self.benchmark:
            notes.append(f"{self.benchmark}: the published figures beside these are in benchmark.json")
        return AppSection(
            "debias",
            f"Removing a spurious feature ({self.model})",
            summary,
            ["reading (test split)", "k", "worst group", "average", *groups],
            rows,
            [f.for_section() for f in self.figures()],
            self.command,
            notes,
        )


def _sizes(n_images: dict[str, int]) -> str:
    return " / ".join(f"{k} {v:,}" for k, v in n_images.items())


def default_features(source: ImageSource) -> dict[str, list[str]]:
    """:data:`WORLD_FEATURES` for a world export, else the shipped ``"waterbirds"`` set."""
    return dict(WORLD_FEATURES) if source.is_world else load_features("waterbirds")


class Debias(ComponentApplication[DebiasConfig, DebiasResult]):
    """``vitdecomp debias``: check the metadata, analyse the images, rank, ablate, read (see the module
    text)."""

    name = "debias"

    def check(self, cfg: DebiasConfig) -> None:
        check_at_least("--n-random", cfg.n_random, 1)
        read_metadata(cfg.metadata_path)

    def measure(
        self, cfg: DebiasConfig, source: ImageSource, analyse: Callable[[], AnalysedComponents]
    ) -> DebiasResult:
        meta = read_metadata(cfg.metadata_path)
        if source.errors:  # --skip-bad-images: the skipped images leave the splits
            meta = meta.only(set(source.ids))
            check_groups(meta, cfg.metadata_path)
        split = Split.of(meta, rows_in_source(meta, source, cfg.metadata_path))
        features = _features(cfg.features, source)
        comps = analyse()
        ablation = MeanAblation.fit(comps.contributions, comps.labels, split.rows[TRAIN])
        methods = (
            [DEFAULT_SCORE, *(m for m in score_names() if m != DEFAULT_SCORE)] if cfg.score == AUTO else [cfg.score]
        )
        tables = comps.score_tables(features, split.rows[TRAIN], methods)
        pairs = {m: (t["spurious"], t["core"]) for m, t in tables.items()}
        score = choose_score(ablation, split, pairs) if cfg.score == AUTO else cfg.score
        table = tables[score]
        text = comps.embed(features["spurious"]) if comps.models.subject.is_clip else None
        readings, curve = debias_arrays(
            ablation, split, table["spurious"], table["core"], spurious_text=text, n_random=cfg.n_random, seed=cfg.seed
        )
        diff = table["spurious"] - table["core"]
        order = torch.argsort(diff, descending=True, stable=True).tolist()
        return DebiasResult(
            model=cfg.model,
            images=str(cfg.images),
            corr=_corr(Path(cfg.images)),
            score=score + (" (auto: chosen on validation)" if cfg.score == AUTO else ""),
            features=features,
            n_images={SPLIT_NAMES[s]: len(r) for s, r in split.rows.items()},
            k=readings[1].k,
            rule=K_RULE,
            readings=readings,
            curve=curve,
            ranking=[(ablation.labels[i], float(diff[i])) for i in order],
            command=cfg.command(),
            benchmark=BENCHMARK if meta.official else "",
        )


def _features(spec: str | Path | None, source: ImageSource) -> dict[str, list[str]]:
    if spec is None:
        return default_features(source)
    try:
        features = load_features(spec)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--features {spec}: {err}") from err
    if not {"spurious", "core"} <= set(features):
        raise UsageError(f"--features {spec}: needs the features 'spurious' and 'core', has {sorted(features)}")
    return {"spurious": features["spurious"], "core": features["core"]}


def _corr(folder: Path) -> float | None:
    """The train correlation a world export was written with (``world.json``), if known."""
    try:
        return float(json.loads((folder / "world.json").read_text())["corr"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def draw_curve(result: DebiasResult) -> bytes:
    """The k curve as PNG bytes: validation and test worst-group / average accuracy, the chosen k,
    DFR's level."""
    plt = pyplot()
    ks = [p.k for p in result.curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(ks, [p.test.worst for p in result.curve], "-", color="C3", label="test worst group")
    ax.plot(ks, [p.test.average for p in result.curve], "-", color="C0", label="test average")
    ax.plot(ks, [p.val.worst for p in result.curve], ":", color="C3", label="val worst group (chooses k)")
    ax.plot(ks, [p.val.average for p in result.curve], ":", color="C0", label="val average")
    ax.axvline(result.k, color="0.3", lw=0.8, ls="--", label=f"chosen k = {result.k}")
    ax.axhline(result.reading("DFR").test.worst, color="C2", lw=0.8, label="DFR test worst group")
    ax.set_xlabel("k (top components by score(spurious) - score(core), mean-ablated)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result.model}: debias (corr {result.corr})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return figure_png(fig, bbox_inches="tight")
