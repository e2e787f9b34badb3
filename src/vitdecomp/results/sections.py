"""What an application hands its readers: its typed result (the :class:`AppResult` contract), the
plots it draws (:class:`Figure`) and its part of the report (:class:`AppSection`).

Below the applications (``vitdecomp.apps``), the renderer (``vitdecomp.report``) and the command line,
so that an application builds its section without importing the renderer, and the renderer draws any
application's section without knowing the application.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any, ClassVar, Protocol, TypeAlias

from vitdecomp.figures import jpeg_data_uri, png_data_uri

#: A file an application hands over: its bytes, or a function writing it to an open binary file.
FileData: TypeAlias = bytes | Callable[[IO[bytes]], object]


@dataclass(frozen=True)
class AppFigure:
    """A figure of a section: a PNG (or JPEG) as a ``data:image/...;base64,...`` URI and its caption."""

    data_uri: str
    caption: str = ""


@dataclass(frozen=True)
class AppPanel:
    """A side panel of one table row, opened from the row's first cell: its ``title``, ``facts``
    (``[name, value]`` pairs of formatted text), signed ``bars`` (``[label, value]``, drawn relative
    to the largest ``|value|``; negative ones marked), their heading ``bars_title``, and ``figures``."""

    title: str
    facts: list[list[str]] = field(default_factory=list)
    bars: list[tuple[str, float]] = field(default_factory=list)
    bars_title: str = ""
    figures: list[AppFigure] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppPanel:
        bars = [(str(label), float(v)) for label, v in d.get("bars", [])]
        return cls(**{**d, "bars": bars, "figures": [AppFigure(**f) for f in d.get("figures", [])]})


@dataclass(frozen=True)
class AppSection:
    """One application's part of the report.

    ``title`` heads the section; ``summary`` is one or two plain sentences (the result in words);
    ``header`` / ``rows`` a table of already formatted cells; ``sort`` makes it sortable: per column
    ``"number"``, ``"text"`` or ``""`` (not sortable); ``panels`` one :class:`AppPanel` per row (or
    none); ``figures`` PNGs with captions; ``command`` the command line that reproduces it; ``notes``
    caveats (controls, settings).
    """

    name: str
    title: str
    summary: str
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: list[AppFigure] = field(default_factory=list)
    command: str = ""
    notes: list[str] = field(default_factory=list)
    sort: list[str] = field(default_factory=list)
    panels: list[AppPanel] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppSection:
        figures = [AppFigure(**f) for f in d.get("figures", [])]
        return cls(**{**d, "figures": figures, "panels": [AppPanel.from_dict(p) for p in d.get("panels", [])]})


@dataclass(frozen=True)
class Figure:
    """A plot an application drew: PNG bytes, the file stem it is saved under (``<name>.png``) and a
    caption."""

    name: str
    png: bytes = field(repr=False)
    caption: str = ""

    def for_section(self, picture: bool = False) -> AppFigure:
        """The figure in a section: the PNG inlined, or (``picture``: images and maps, no fine lines
        or text to keep sharp) as a JPEG, a fraction of the bytes."""
        return AppFigure(jpeg_data_uri(self.png) if picture else png_data_uri(self.png), self.caption)


class AppResult(Protocol):
    """The contract of an application's typed result: JSON both ways, its part of the report, its
    plots and any other file it hands over (bytes, or a function that writes a large file to an open
    binary file, so that it need not be held in memory at once). ``name`` names the section and the output files,
    ``json_name`` its JSON file (``<json_name>.json``, ``<name>.section.json``, each figure's
    ``<figure name>.png``, each of :meth:`files`; :func:`vitdecomp.report.outputs.write_app_outputs`)."""

    name: ClassVar[str]
    json_name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppResult: ...

    def section(self) -> AppSection: ...

    def figures(self) -> list[Figure]: ...

    def files(self) -> dict[str, FileData]: ...


class ResultBase:
    """Defaults of the :class:`AppResult` contract for a dataclass result: ``to_dict`` is
    :func:`dataclasses.asdict`, ``from_dict`` its inverse (:func:`vitdecomp.results.serial.from_dict`),
    no figures, no other files; ``json_name`` is ``name``. A result overrides what it has."""

    name: ClassVar[str] = ""
    json_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("json_name"):
            cls.json_name = cls.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        from vitdecomp.results.serial import from_dict

        return from_dict(cls, d)

    def figures(self) -> list[Figure]:
        return []

    def files(self) -> dict[str, FileData]:
        return {}
