"""The report of ``vitdecomp analyze``, rendered from the results schema (:mod:`vitdecomp.results`):
a self-contained ``index.html`` (:mod:`~vitdecomp.report.html`, Jinja2 templates), the summary
printed at the end of a run (:mod:`~vitdecomp.report.console`), an application's section added to a
finished report (:mod:`~vitdecomp.report.attach`), the files an application run writes
(:mod:`~vitdecomp.report.outputs`) and ``retrieve``'s gallery page (:mod:`~vitdecomp.report.gallery`).
Imports only the floors below it: never the pipeline, the applications or the command line."""

from vitdecomp.report.console import summary
from vitdecomp.report.html import page_run_id, render_html, report_page

__all__ = ["page_run_id", "render_html", "report_page", "summary"]
