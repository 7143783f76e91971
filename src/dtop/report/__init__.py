"""Reports: tables, figures and HTML pages of results (``dtop report``, ``dtop plot``, contact sheets)."""

from dtop.report.html import build_report
from dtop.report.results import load_results

__all__ = ["build_report", "load_results"]
