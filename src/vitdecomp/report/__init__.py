"""The report of ``vitdecomp analyze``: the typed result (``results.json``), a self-contained
``index.html`` beside it, and the summary printed at the end of a run."""

from vitdecomp.report.console import summary
from vitdecomp.report.html import render_html, thumbnail_data_uri, write_report
from vitdecomp.results import AnalysisResult

__all__ = ["AnalysisResult", "render_html", "summary", "thumbnail_data_uri", "write_report"]
