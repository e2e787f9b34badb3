"""The report of ``vitdecomp analyze``: a self-contained ``index.html`` beside ``results.json``."""

from vitdecomp.report.html import render_html, thumbnail_data_uri, write_report

__all__ = ["render_html", "thumbnail_data_uri", "write_report"]
