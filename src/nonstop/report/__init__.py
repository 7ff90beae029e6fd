"""Reports: pictures of what a demo or a benchmark saw (``nonstop.report.timeline``)."""
