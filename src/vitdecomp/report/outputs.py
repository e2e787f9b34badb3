"""What an application run writes, in one place: :func:`write_app_outputs`.

Into its output folder, atomically each (:mod:`vitdecomp.fsio`): ``<json_name>.json`` (the result's
``to_dict()``), ``<name>.section.json`` (its report section), ``<figure>.png`` for each of its
figures and each of its other files (bytes, or streamed by the result's own writer function). The
algorithm modules (:mod:`vitdecomp.apps`) write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitdecomp.fsio import atomic_write, atomic_write_bytes, atomic_write_text, writing
from vitdecomp.results import AppResult


def write_app_outputs(result: AppResult, out: str | Path, section: bool = True) -> list[Path]:
    """Write ``result``'s files into ``out`` (made if missing); returns their paths, the JSON first.
    ``section``: also ``<name>.section.json``."""
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write_text(out / f"{result.json_name}.json", json.dumps(result.to_dict(), indent=1))]
    for fig in result.figures():
        paths.append(atomic_write_bytes(out / f"{fig.name}.png", fig.png))
    for name, data in result.files().items():
        paths.append(atomic_write(out / name, data) if callable(data) else atomic_write_bytes(out / name, data))
    if section:
        paths.append(atomic_write_text(out / f"{result.name}.section.json", json.dumps(result.section().to_dict())))
    return paths
