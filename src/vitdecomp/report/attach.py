"""Add an application's section to an ``analyze`` report folder: :func:`attach_section`.

The one way an application (``vitdecomp debias / segment / ablate --report DIR``) reaches the report:
the section is added to (or replaces, by :attr:`AppSection.name`) ``DIR/results.json``'s
``applications``, and ``DIR/index.html`` is brought up to date from that file. The page's
applications part is rendered again from the template and put between its markers
(``<!-- vitdecomp:applications -->``), so the rest of the page, thumbnails included, is kept as
``analyze`` wrote it; a page without the markers (written before them) is rendered whole from
``results.json`` (its thumbnails are then lost, as ``results.json`` holds no images).

Both files are written atomically (:mod:`vitdecomp.fsio`), ``results.json`` first, under an ``flock``
on ``DIR`` itself (:func:`vitdecomp.fsio.folder_lock`: no lock file left behind, released by the kernel
if the writer dies), so two applications finishing at once do not lose each other's section. A page
whose run id is not ``results.json``'s (an ``analyze`` killed between writing the two) is rendered
whole from ``results.json``, never patched with another run's sections.
"""

from __future__ import annotations

from pathlib import Path

from vitdecomp.errors import UsageError
from vitdecomp.fsio import atomic_write_text, folder_lock, remove_stale_temps
from vitdecomp.report.html import environment, page_run_id, render_html
from vitdecomp.results import AnalysisResult, AppSection

#: The files of a report folder, written in this order (``results.json`` is the data, the page shows it).
REPORT_FILES = ("results.json", "index.html")
BEGIN = "<!-- vitdecomp:applications -->"
END = "<!-- /vitdecomp:applications -->"


def check_report(folder: str | Path) -> Path:
    """``folder`` if it is an ``analyze`` output folder (a readable ``results.json`` and an
    ``index.html``), else a one-line :class:`UsageError` naming it. Call it before the long work."""
    folder = Path(folder)
    hint = "give the --out folder of a `vitdecomp analyze` run"
    if not folder.is_dir():
        raise UsageError(f"--report {folder}: no such folder; {hint}")
    for name in ("results.json", "index.html"):
        if not (folder / name).is_file():
            raise UsageError(f"--report {folder}: no {name} in it; {hint}")
    _load(folder)
    return folder


def _load(folder: Path) -> AnalysisResult:
    try:
        return AnalysisResult.load(folder / "results.json")
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"--report {folder}: results.json is not an analyze result ({why})") from None


def with_section(result: AnalysisResult, section: AppSection) -> AnalysisResult:
    """``result`` with ``section`` in place of the one of the same name, or appended (in place)."""
    apps = [a for a in result.applications if a.name != section.name]
    at = next((i for i, a in enumerate(result.applications) if a.name == section.name), len(apps))
    apps.insert(at, section)
    result.applications = apps
    return result


def applications_html(result: AnalysisResult) -> str:
    """The page's applications part, from :data:`BEGIN` to :data:`END` (the template writes both)."""
    html = environment().get_template("sections/applications.html.j2").render(r=result)
    return html[html.index(BEGIN) : html.index(END) + len(END)]


def updated_page(page: str, result: AnalysisResult) -> str:
    """``page`` with its applications part rendered again from ``result``; the whole page from
    ``result`` when ``page`` has no markers or shows another run than ``result``."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start or page_run_id(page) != (result.run_id or None):
        return render_html(result)
    return page[:start] + applications_html(result) + page[end + len(END) :]


def attach_section(folder: str | Path, section: AppSection) -> Path:
    """Put ``section`` into the report in ``folder`` (``results.json`` and ``index.html``); returns
    the page's path. A folder that is not an ``analyze`` output is a one-line :class:`UsageError`."""
    folder = check_report(folder)
    with folder_lock(folder):
        remove_stale_temps(folder, REPORT_FILES)
        result = with_section(_load(folder), section)
        page = (folder / "index.html").read_text(encoding="utf-8")
        result.write(folder / "results.json")
        return atomic_write_text(folder / "index.html", updated_page(page, result))
