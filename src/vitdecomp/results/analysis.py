"""The result of one analysis, typed: :class:`AnalysisResult` is the schema of ``results.json``.

:meth:`AnalysisResult.to_dict` gives the JSON document (keys in the order below; non-finite numbers
become ``null``), :meth:`AnalysisResult.from_dict` / :meth:`AnalysisResult.load` read one back, so
the report can be rendered again from a ``results.json`` alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdecomp.fsio import atomic_write_text
from vitdecomp.results.sections import AppSection
from vitdecomp.results.views import ReportViews

#: The schema version ``results.json`` states (``format_version``). 2 added ``ranked_by``; version 1 files
#: are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: The scores earlier versions ranked by, newest first (version 1 files do not name theirs).
EARLIER_DEFAULTS = ("text_probe", "ablation", "invariant")


@dataclass
class ModelInfo:
    """The subject model."""

    name: str
    weights_id: str
    is_clip: bool


@dataclass
class ReaderInfo:
    """The CLIP model that reads the components (``"clip"`` in results.json)."""

    name: str
    weights_id: str


@dataclass
class ImagesInfo:
    """The image set: what it is, its store key, its size and the files skipped as unreadable."""

    description: str
    key: str
    n: int
    skipped: list[str] = field(default_factory=list)
    root: str = ""  # the folder the image ids are relative to ("" for generated world scenes)


@dataclass
class VocabularyInfo:
    """The vocabulary the descriptions were picked from, and the prompt templates of its entries."""

    name: str
    size: int
    templates: list[str]


@dataclass
class Pick:
    """One TextSpan description of a component (see :class:`vitdecomp.text.Description`)."""

    text: str
    explained: float
    projection: float


@dataclass
class TopImage:
    """An image where a component's aligned contribution points most along its top description."""

    id: str
    projection: float


@dataclass
class Completeness:
    """Relative error ``||sum of parts - representation|| / ||representation||`` over the images."""

    max_relative_error: float
    mean_relative_error: float
    median_relative_error: float


@dataclass
class Alignment:
    """How the components were mapped into the reader's space: the aligner's ``mode`` and ``lam``,
    where it came from (``state``: identity, given, loaded, trained), its cosine over every image,
    and the aligner's own training metrics (``val_cosine``, ``n_train``, ...; flat in the JSON)."""

    mode: str
    lam: float
    state: str
    cosine_all_images: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        head = {"mode": self.mode, "lam": self.lam, "state": self.state, "cosine_all_images": self.cosine_all_images}
        return {**head, **self.metrics}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alignment:
        head = ("mode", "lam", "state", "cosine_all_images")
        return cls(*(d[k] for k in head), metrics={k: v for k, v in d.items() if k not in head})


@dataclass
class StoreInfo:
    """The store the rows were read from."""

    path: str
    key: dict[str, Any]
    key_digest: str


@dataclass
class AlignerInfo:
    """Where the aligner lives (``None``: the identity) and the store key it was trained for."""

    path: str | None
    key: dict[str, Any] | None


@dataclass
class CacheInfo:
    """What this run reused from the cache and what it computed."""

    dir: str
    store_rows_computed: int
    store_rows_reused: int
    aligner: str
    text_encoder_batches: int


@dataclass
class OutputPaths:
    """The files written: the report folder, ``results.json`` and ``index.html``."""

    out: str
    results: str
    html: str


@dataclass
class AnalysisResult:
    """Everything ``vitdecomp analyze`` found; the content of ``results.json``.

    ``scores[method][feature][label]``: the score of each component for each feature (``"paper"``
    and ``"invariant"``); ``rankings[method][feature]``: the labels, best first;
    ``descriptions[label]``: TextSpan picks; ``top_images[label]``; ``mean_aligned_norm[label]``;
    ``timings_s``: seconds per stage; ``paths`` is set once the outputs are written;
    ``warnings``: why this run's figures may mean little (few images, a weak alignment, random
    weights, ...); ``constant[label]``: the relative second singular value of each component found
    rank-1 / constant over the images (below :data:`vitdecomp.pipeline.stages.RANK1_THRESHOLD`),
    which get neither descriptions nor top images;
    ``confidence[method]``: how sure each score is (:meth:`vitdecomp.scores.ScoreConfidence.to_dict`):
    ``n_boot``, ``n_null``, ``level``, then ``scores[feature][label] = {score, low, high, null_mean,
    null_high, p, significant}`` (bootstrap interval over images; null = random groups of as many real
    texts, stated under ``null``; ``p <= 0.05`` with 19 null draws: the score beats every null draw;
    ``significant``: that, in a feature present in the images);
    ``presence``: whether each feature is in the images at all
    (:meth:`vitdecomp.scores.presence.FeaturePresence.to_dict`: ``features[feature] = {r2, null_mean,
    null_high, p, present}``; ``{}``: not tested);
    ``views``: the report's heatmaps, head grids and retrieval galleries (``None``: not computed);
    ``applications``: one :class:`~vitdecomp.results.AppSection` per application run;
    ``run_id``: which run wrote it (``index.html`` carries the same id, so a reader can tell a page
    and a ``results.json`` of different runs apart).
    """

    model: ModelInfo
    reader: ReaderInfo
    images: ImagesInfo
    start_layer: int | None
    labels: list[str]
    features: dict[str, list[str]]
    vocabulary: VocabularyInfo
    scores: dict[str, dict[str, dict[str, float]]]
    rankings: dict[str, dict[str, list[str]]]
    descriptions: dict[str, list[Pick]]
    mean_aligned_norm: dict[str, float]
    top_images: dict[str, list[TopImage]]
    completeness: Completeness
    alignment: Alignment
    store: StoreInfo
    aligner: AlignerInfo
    cache: CacheInfo
    timings_s: dict[str, float] = field(default_factory=dict)
    paths: OutputPaths | None = None
    warnings: list[str] = field(default_factory=list)
    constant: dict[str, float] = field(default_factory=dict)
    confidence: dict[str, Any] = field(default_factory=dict)
    presence: dict[str, Any] = field(default_factory=dict)
    views: ReportViews | None = None
    applications: list[AppSection] = field(default_factory=list)
    ranked_by: str | None = None
    run_id: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def n_components(self) -> int:
        return len(self.labels)

    def absent_features(self) -> list[str]:
        """The features the presence test found not in the images (``[]`` when untested)."""
        return [f for f, v in self.presence.get("features", {}).items() if not v.get("present", True)]

    def method(self) -> str:
        """The score the tables are ranked by: ``ranked_by`` (stated since schema 2); for a version 1
        file, the default of the analyses that wrote one (:data:`EARLIER_DEFAULTS`, newest first), else
        its first score."""
        have = [m for m in (self.ranked_by, *EARLIER_DEFAULTS) if m in self.scores]
        return have[0] if have else next(iter(self.scores), "")

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document."""
        d = {
            "format_version": self.format_version,
            "ranked_by": self.ranked_by,
            "run_id": self.run_id,
            "model": asdict(self.model),
            "clip": asdict(self.reader),
            "images": asdict(self.images),
            "start_layer": self.start_layer,
            "labels": list(self.labels),
            "n_components": self.n_components,
            "features": self.features,
            "vocabulary": asdict(self.vocabulary),
            "scores": self.scores,
            "rankings": self.rankings,
            "descriptions": {lab: [asdict(p) for p in ps] for lab, ps in self.descriptions.items()},
            "mean_aligned_norm": self.mean_aligned_norm,
            "top_images": {lab: [asdict(t) for t in ts] for lab, ts in self.top_images.items()},
            "completeness": asdict(self.completeness),
            "alignment": self.alignment.to_dict(),
            "store": asdict(self.store),
            "aligner": asdict(self.aligner),
            "cache": asdict(self.cache),
            "timings_s": self.timings_s,
            "warnings": list(self.warnings),
            "constant": self.constant,
            "confidence": self.confidence,
            "presence": self.presence,
            "views": None if self.views is None else self.views.to_dict(),
            "applications": [a.to_dict() for a in self.applications],
        }
        if self.paths is not None:
            d["paths"] = asdict(self.paths)
        return _jsonable(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (``results.json``)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisResult:
        """The result a ``results.json`` document holds."""
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"results format {d.get('format_version')}, this vitdecomp reads {READABLE_VERSIONS}")
        return cls(
            model=ModelInfo(**d["model"]),
            reader=ReaderInfo(**d["clip"]),
            images=ImagesInfo(**d["images"]),
            start_layer=d["start_layer"],
            labels=list(d["labels"]),
            features=d["features"],
            vocabulary=VocabularyInfo(**d["vocabulary"]),
            scores=d["scores"],
            rankings=d["rankings"],
            descriptions={lab: [Pick(**p) for p in ps] for lab, ps in d["descriptions"].items()},
            mean_aligned_norm=d["mean_aligned_norm"],
            top_images={lab: [TopImage(**t) for t in ts] for lab, ts in d["top_images"].items()},
            completeness=Completeness(**d["completeness"]),
            alignment=Alignment.from_dict(d["alignment"]),
            store=StoreInfo(**d["store"]),
            aligner=AlignerInfo(**d["aligner"]),
            cache=CacheInfo(**d["cache"]),
            timings_s=d.get("timings_s", {}),
            paths=OutputPaths(**d["paths"]) if d.get("paths") else None,
            warnings=list(d.get("warnings", [])),
            constant=d.get("constant", {}),
            confidence=d.get("confidence", {}),
            presence=d.get("presence", {}),
            views=ReportViews.from_dict(d["views"]) if d.get("views") else None,
            applications=[AppSection.from_dict(a) for a in d.get("applications", [])],
            ranked_by=d.get("ranked_by"),
            run_id=d.get("run_id", ""),
            format_version=d["format_version"],
        )

    @classmethod
    def load(cls, path: str | Path) -> AnalysisResult:
        """Read a ``results.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _jsonable(x: Any) -> Any:
    """Plain JSON values: containers copied, numpy scalars and arrays as Python numbers, non-finite
    floats as ``None``."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
