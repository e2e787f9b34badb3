"""What the report shows beyond the scores: heatmaps, head grids and retrieval galleries, as figures.

A leaf module (imports nothing from vitdecomp), like :mod:`vitdecomp.results`: the
applications (:func:`vitdecomp.apps.report_figures.report_views`) fill a :class:`ReportViews` during
``vitdecomp analyze``, the renderer draws it, and ``results.json`` keeps it (``"views"``) so a page can
be rendered again from that file. Figures are PNG ``data:`` URIs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageMap:
    """One heatmap: ``image`` (its id in the image set) with the map over it (``data_uri``), the text
    whose direction it reads and the heads summed."""

    image: str
    text: str
    heads: list[str]
    data_uri: str


@dataclass(frozen=True)
class FeatureView:
    """Per feature: the layer x head grid of the heads' scores (``grid``, a figure), the top heads
    and their maps on a few images."""

    feature: str
    grid: str
    heads: list[str]
    maps: list[ImageMap] = field(default_factory=list)


@dataclass(frozen=True)
class ComponentView:
    """One head's own maps on its top images, along its top description."""

    label: str
    text: str
    maps: list[ImageMap] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    """One retrieved image: its id and its score (its thumbnail is drawn from the image set when the
    page is written, like the components' top images)."""

    id: str
    score: float


@dataclass(frozen=True)
class RetrievalGallery:
    """The images a text finds through a feature's top components (``components``; all: the whole
    representation)."""

    feature: str
    text: str
    components: list[str]
    hits: list[Hit] = field(default_factory=list)


@dataclass
class ReportViews:
    """Everything figure-like the report shows; ``rules`` says how the heads, texts and components
    were chosen (one sentence each)."""

    features: list[FeatureView] = field(default_factory=list)
    components: dict[str, ComponentView] = field(default_factory=dict)
    galleries: list[RetrievalGallery] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReportViews:
        def maps(ms: list[dict[str, Any]]) -> list[ImageMap]:
            return [ImageMap(**m) for m in ms]

        return cls(
            features=[FeatureView(**{**f, "maps": maps(f.get("maps", []))}) for f in d.get("features", [])],
            components={
                lab: ComponentView(**{**c, "maps": maps(c.get("maps", []))})
                for lab, c in d.get("components", {}).items()
            },
            galleries=[
                RetrievalGallery(**{**g, "hits": [Hit(**h) for h in g.get("hits", [])]}) for g in d.get("galleries", [])
            ],
            rules=list(d.get("rules", [])),
        )
