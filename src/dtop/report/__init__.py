"""Reports: tables, figures and HTML pages of results (``dtop report``)."""

from dtop.report.html import build_report, load_results

__all__ = ["build_report", "load_results"]
