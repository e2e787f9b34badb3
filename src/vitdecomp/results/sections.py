"""What an application hands the report: one :class:`AppSection` per application run.

A leaf module (imports nothing from vitdecomp), so that applications (``vitdecomp.apps``) can build
their section without importing the renderer, and the renderer (``vitdecomp.report.html``) can draw any
application's section without knowing the application.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AppFigure:
    """A figure of a section: a PNG as a ``data:image/png;base64,...`` URI and its caption."""

    data_uri: str
    caption: str = ""


@dataclass(frozen=True)
class AppSection:
    """One application's part of the report.

    ``title`` heads the section; ``summary`` is one or two plain sentences (the result in words);
    ``header`` / ``rows`` a table of already formatted cells; ``figures`` PNGs with captions;
    ``command`` the command line that reproduces it; ``notes`` caveats (controls, settings).
    """

    name: str
    title: str
    summary: str
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: list[AppFigure] = field(default_factory=list)
    command: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppSection:
        figures = [AppFigure(**f) for f in d.get("figures", [])]
        return cls(**{**d, "figures": figures})
