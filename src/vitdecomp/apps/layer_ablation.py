"""Where the representation is formed, and what a feature's top components do (``vitdecomp ablate``).

Both read the representation with parts mean-ablated (:class:`~vitdecomp.apps.mean_ablation.MeanAblation`,
means over the training half of the images):

* **Layer ablation** (the paper's figure): every component of the last ``n`` layers (blocks) is
  mean-ablated, ``n = 0 .. L``, and the representation is read by a linear probe per feature fitted
  on the unablated training half (:class:`~vitdecomp.apps.classifiers.LinearHead`); by the model's own
  linear head where it has one that reads the representation (the zoo's multi-attribute heads,
  :func:`vitdecomp.apps.classifiers.own_heads`); and for a CLIP subject zero-shot with the feature's class texts
  (:class:`~vitdecomp.apps.classifiers.ZeroShotHead`).
  Components outside the blocks (``init``, norm biases) are never ablated; ``n = 0`` is the
  unablated accuracy.
* **A feature's top components**: per feature, its top ``k`` components by the applications'
  default score (over the training half) are mean-ablated, and that feature's probe reads the test
  half; the control is ``k`` components drawn at random (``n_random`` draws). The other features'
  mean probe accuracy under the same ablation says how specific the components are.

Labels: a world export folder's ``attributes.csv`` or generated world scenes (the four core
attributes), or any folder with ``--labels CSV`` (``img_filename`` + one column per feature, its
values the feature's descriptions). ``vitdecomp ablate [--images DIR [--labels CSV]] [--model M]``
writes ``ablate.json``, ``ablate.png`` and ``ablate.section.json`` (the report's
:class:`~vitdecomp.results.AppSection`).
"""

from __future__ import annotations

import csv
import functools
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vitdecomp.apps.classifiers import LinearHead, ZeroShotHead, accuracy, own_heads
from vitdecomp.apps.contract import AnalysedConfig, ComponentApplication
from vitdecomp.apps.mean_ablation import AnalysedComponents, MeanAblation
from vitdecomp.checks import check_at_least
from vitdecomp.components import ComponentLabel
from vitdecomp.defaults import ABLATE_KS, ABLATE_N_IMAGES, ABLATE_OUT, ALIGN_STEPS, N_RANDOM, READER, WORLD_SEED
from vitdecomp.errors import UsageError
from vitdecomp.figures import figure_png, pyplot
from vitdecomp.imageset import ImageSource, display_name
from vitdecomp.pipeline.config import AnalysisConfig
from vitdecomp.results import AppSection, Figure, ResultBase
from vitdecomp.scores import DEFAULT_SCORE
from vitdecomp.text import world_class_embeddings
from vitdecomp.world import ATTRIBUTES, CORE_ATTRIBUTES

DEFAULT_KS = ABLATE_KS


@dataclass
class FeatureLabels:
    """A feature's values (its descriptions) and each image's value index ``y [N]``."""

    values: list[str]
    y: np.ndarray


def world_labels(source: ImageSource) -> dict[str, FeatureLabels]:
    """The core attributes of world scenes (generated or exported)."""
    assert source.attributes is not None
    return {a: FeatureLabels(list(ATTRIBUTES[a]), np.asarray(source.attributes[a])) for a in CORE_ATTRIBUTES}


def read_labels(path: str | Path, source: ImageSource) -> dict[str, FeatureLabels]:
    """Labels from a CSV (``img_filename`` + one column per feature) for the source's images."""
    path, name = Path(path), display_name(path)
    if not path.is_file():
        raise UsageError(f"no labels file {name}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header, table = list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{name}: not a readable CSV ({err})") from err
    if "img_filename" not in header or len(header) < 2 or not table:
        raise UsageError(f"{name}: needs a column img_filename, one column per feature and at least one row")
    by_file = {r["img_filename"]: r for r in table}
    lost = [i for i in source.ids if i not in by_file]
    if lost:
        raise UsageError(f"{name}: no row for {len(lost)} image(s) of the folder, e.g. {lost[0]}")
    out = {}
    for col in (c for c in header if c != "img_filename"):
        cells = [str(by_file[i][col] or "").strip() for i in source.ids]
        values = sorted(set(cells))
        if "" in values or len(values) < 2:
            raise UsageError(f"{name}: column {col} needs a value in every row and at least two values")
        out[col] = FeatureLabels(values, np.asarray([values.index(c) for c in cells]))
    return out


# ----------------------------------------------------------------------------------------------
# the measurements on arrays


@dataclass
class LayerPoint:
    """Accuracy per feature with the last ``removed`` layers mean-ablated (``zero_shot``: CLIP only)."""

    removed: int
    layers: list[int]
    probe: dict[str, float]
    zero_shot: dict[str, float] = field(default_factory=dict)
    model_head: dict[str, float] = field(default_factory=dict)


def layer_order(parts: list[ComponentLabel]) -> list[int]:
    """The blocks (global layer indices) in order; components without one are never ablated."""
    return sorted({p.layer for p in parts if p.layer is not None})


def layer_curve(
    ablation: MeanAblation,
    parts: list[ComponentLabel],
    heads: dict[str, dict[str, LinearHead | ZeroShotHead]],
    y: dict[str, np.ndarray],
    rows: np.ndarray,
) -> list[LayerPoint]:
    """Accuracy of ``heads`` (``{"probe" | "zero_shot" | "model_head": {feature: head}}``) on ``rows`` against the
    labels ``y`` (``{feature: [len(rows)]}``), for 0 .. L last layers mean-ablated."""
    layers = layer_order(parts)
    points = []
    for n in range(len(layers) + 1):
        gone = set(layers[len(layers) - n :])
        z = ablation.ablate([i for i, p in enumerate(parts) if p.layer in gone], rows)
        acc = {kind: {f: accuracy(h.predict(z), y[f]) for f, h in hs.items()} for kind, hs in heads.items()}
        points.append(
            LayerPoint(n, sorted(gone), acc.get("probe", {}), acc.get("zero_shot", {}), acc.get("model_head", {}))
        )
    return points


@dataclass
class FeatureEffect:
    """One feature's probe accuracy (test half) with its top ``k`` components mean-ablated, against
    ``k`` random components (mean and sd over draws), and the other features' mean accuracy under the
    top-``k`` ablation; ``base``: unablated."""

    feature: str
    base: float
    ks: list[int]
    top: list[float]
    random_mean: list[float]
    random_sd: list[float]
    others_top: list[float]
    components: list[str]


def feature_effects(
    ablation: MeanAblation,
    orders: dict[str, list[int]],
    probes: dict[str, LinearHead],
    y: dict[str, np.ndarray],
    rows: np.ndarray,
    ks: list[int],
    n_random: int = 5,
    seed: int = 0,
) -> list[FeatureEffect]:
    """Per feature, :class:`FeatureEffect` for every ``k`` of ``ks`` (``orders``: components best first)."""
    rng = np.random.default_rng(seed)
    base = {f: accuracy(p.predict(ablation.whole(rows)), y[f]) for f, p in probes.items()}
    out = []
    for f, order in orders.items():
        top, rnd_m, rnd_s, others = [], [], [], []
        for k in ks:
            z = ablation.ablate(order[:k], rows)
            top.append(accuracy(probes[f].predict(z), y[f]))
            rest = [accuracy(p.predict(z), y[g]) for g, p in probes.items() if g != f]
            others.append(float(np.mean(rest)) if rest else float("nan"))
            draws = [
                accuracy(
                    probes[f].predict(ablation.ablate(rng.choice(ablation.n_components, k, replace=False), rows)), y[f]
                )
                for _ in range(n_random)
            ]
            rnd_m.append(float(np.mean(draws)))
            rnd_s.append(float(np.std(draws)))
        names = [ablation.labels[i] for i in order[: max(ks)]]
        out.append(FeatureEffect(f, base[f], list(ks), top, rnd_m, rnd_s, others, names))
    return out


# ----------------------------------------------------------------------------------------------
# the application


@dataclass(kw_only=True)
class AblateConfig(AnalysedConfig):
    """Options of ``vitdecomp ablate``: the images (``None``: ``n_images`` generated world scenes from
    ``seed``, which also draws the train/test halves and the random components) and their ``labels``
    (a CSV, paths relative to the images folder), the ``ks`` of the per-feature ablation, the random
    draws; the rest as :class:`AnalysedConfig`."""

    labels: str | Path | None = None
    n_images: int = ABLATE_N_IMAGES
    seed: int = WORLD_SEED
    ks: tuple[int, ...] = DEFAULT_KS
    n_random: int = N_RANDOM
    out: str | Path = ABLATE_OUT

    def command(self) -> str:
        """The command line that reproduces this run (options left at their defaults omitted)."""
        where = ["--images", shlex.quote(str(self.images))] if self.images is not None else []
        if self.images is None and self.n_images != ABLATE_N_IMAGES:
            where += ["--n-images", str(self.n_images)]
        flags = {"--labels": self.labels, "--checkpoint": self.checkpoint}
        flags |= {"--seed": self.seed if self.seed != WORLD_SEED else None}
        flags |= {"--clip": self.reader if self.reader != READER else None}
        flags |= {"--clip-checkpoint": self.reader_checkpoint}
        flags |= {"--ks": ",".join(map(str, self.ks)) if tuple(self.ks) != DEFAULT_KS else None}
        flags |= {"--align-steps": self.align_steps if self.align_steps != ALIGN_STEPS else None}
        opts = [f"{k} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
        return " ".join(["vitdecomp ablate", *where, "--model", self.model, *opts])

    def analysis(self, **extra: Any) -> AnalysisConfig:
        return super().analysis(n_images=None if self.images is not None else self.n_images, seed=self.seed, **extra)


@dataclass
class AblateResult(ResultBase):
    """Everything ``ablate.json`` holds; :meth:`section` is the report's view of it, :meth:`figures`
    the two curves."""

    name: ClassVar[str] = "ablate"

    model: str
    images: str
    score: str
    n_train: int
    n_test: int
    layers: list[LayerPoint]
    features: list[FeatureEffect]
    command: str = ""

    def figures(self) -> list[Figure]:
        caption = "Left: accuracy vs layers removed. Right: top-k vs random-k per feature."
        return [Figure("ablate", self._png, caption)]

    @functools.cached_property
    def _png(self) -> bytes:
        return draw_ablation(self)

    def section(self) -> AppSection:
        """Layer curve and per-feature top-k vs random, as a table plus the figure."""
        first, last = self.layers[0], self.layers[-1]
        mean0, mean_all = np.mean(list(first.probe.values())), np.mean(list(last.probe.values()))
        summary = (
            f"Mean-ablating all {len(self.layers) - 1} layers moves the mean probe accuracy {mean0:.3f} -> "
            f"{mean_all:.3f}; per feature, ablating its top {self.features[0].ks[-1]} components against as many "
            "random ones is in the table."
        )
        header = ["feature", "unablated", *(f"top {k} / random {k}" for k in self.features[0].ks), "others (top)"]
        rows = [
            [
                e.feature,
                f"{e.base:.3f}",
                *(f"{t:.3f} / {r:.3f}" for t, r in zip(e.top, e.random_mean, strict=True)),
                f"{e.others_top[-1]:.3f}",
            ]
            for e in self.features
        ]
        figures = [f.for_section() for f in self.figures()]
        notes = [
            "Layer curve, mean probe accuracy: "
            + ", ".join(f"{p.removed}: {np.mean(list(p.probe.values())):.3f}" for p in self.layers)
        ]
        return AppSection(
            "ablate", f"Layer ablation ({self.model})", summary, header, rows, figures, self.command, notes
        )


def ablation_labels(cfg: AblateConfig, source: ImageSource) -> dict[str, FeatureLabels]:
    if cfg.labels is not None:
        return read_labels(cfg.labels, source)
    if source.is_world:
        return world_labels(source)
    raise UsageError(f"--images {cfg.images}: no labels; give --labels CSV (img_filename + one column per feature)")


class LayerAblation(ComponentApplication[AblateConfig, AblateResult]):
    """``vitdecomp ablate``: analyse the images, fit the probes, ablate layers and each feature's top
    components (see the module text)."""

    name = "ablate"

    def check(self, cfg: AblateConfig) -> None:
        if not cfg.ks or min(cfg.ks) < 1:
            raise UsageError(f"--ks {cfg.ks}: give positive numbers of components")
        check_at_least("--n-random", cfg.n_random, 0)

    def measure(
        self, cfg: AblateConfig, source: ImageSource, analyse: Callable[[], AnalysedComponents]
    ) -> AblateResult:
        labels = ablation_labels(cfg, source)
        comps = analyse()
        perm = np.random.default_rng(cfg.seed).permutation(len(source))
        train, test = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
        ablation = MeanAblation.fit(comps.contributions, comps.labels, train)
        probes = {f: LinearHead.fit(ablation.whole(train), lab.y[train]) for f, lab in labels.items()}
        heads: dict[str, dict[str, Any]] = {"probe": probes}
        if comps.models.subject.is_clip:
            heads["zero_shot"] = {f: ZeroShotHead(t) for f, t in _class_texts(comps, labels, source).items()}
        if cfg.labels is None:  # world labels: the zoo's heads use the same class order
            own = own_heads(comps.models.subject, comps.source.image(0), comps.contributions[:1])
            heads["model_head"] = {f: h for f, h in own.items() if f in labels}
        y_test = {f: lab.y[test] for f, lab in labels.items()}
        layers = layer_curve(ablation, comps.parts, heads, y_test, test)
        table = comps.scores({f: lab.values for f, lab in labels.items()}, train)
        orders = {f: torch.argsort(table[f], descending=True, stable=True).tolist() for f in labels}
        ks = sorted({min(k, ablation.n_components) for k in cfg.ks})
        effects = feature_effects(ablation, orders, probes, y_test, test, ks, cfg.n_random, cfg.seed)
        return AblateResult(
            cfg.model, source.description, DEFAULT_SCORE, len(train), len(test), layers, effects, cfg.command()
        )


def _class_texts(
    comps: AnalysedComponents, labels: dict[str, FeatureLabels], source: ImageSource
) -> dict[str, torch.Tensor]:
    """Zero-shot class texts per feature: the world's class prompts, else the values as descriptions."""
    world = world_class_embeddings(lambda t: comps.encoder.encode(t, ("{}",))) if source.is_world else {}
    return {f: world[f] if f in world else comps.embed(lab.values) for f, lab in labels.items()}


def draw_ablation(result: AblateResult) -> bytes:
    """PNG bytes of two panels: accuracy vs layers removed; per feature, accuracy vs k for top-k and
    random-k."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    removed = [p.removed for p in result.layers]
    for i, f in enumerate(result.layers[0].probe):
        left.plot(removed, [p.probe[f] for p in result.layers], "-o", ms=3, color=f"C{i}", label=f"{f} (probe)")
        if result.layers[0].model_head:
            left.plot(removed, [p.model_head[f] for p in result.layers], ":", color=f"C{i}", label=f"{f} (own head)")
        if result.layers[0].zero_shot:
            left.plot(removed, [p.zero_shot[f] for p in result.layers], "--", color=f"C{i}", label=f"{f} (zero-shot)")
    left.set_xlabel("last layers mean-ablated")
    left.set_ylabel("accuracy (test half)")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"{result.model}: layer ablation", fontsize=10)
    left.legend(fontsize=7)
    for i, e in enumerate(result.features):
        right.plot(e.ks, e.top, "-o", ms=3, color=f"C{i}", label=f"{e.feature}: top k")
        right.errorbar(
            e.ks,
            e.random_mean,
            yerr=e.random_sd,
            fmt="--",
            color=f"C{i}",
            alpha=0.6,
            label=None if i else "k random (mean, sd)",
        )
    right.set_xscale("log", base=2)
    right.set_xticks(result.features[0].ks, [str(k) for k in result.features[0].ks])
    right.set_xlabel("k components mean-ablated")
    right.set_ylabel("the feature's probe accuracy")
    right.set_ylim(-0.02, 1.02)
    right.set_title("a feature's top-k components (solid) vs k random (dashed)", fontsize=10)
    right.legend(fontsize=6, ncol=2)
    return figure_png(fig, bbox_inches="tight")
