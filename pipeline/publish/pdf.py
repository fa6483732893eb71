"""The report's HTML page printed to an A4 PDF with WeasyPrint (Pango lays out the text, fonts embedded).

WeasyPrint needs Debian's Pango (``libpango-1.0-0``, ``libpangoft2-1.0-0``) and, for the Chinese section, a
CJK font (``fonts-noto-cjk``): ``make sysdeps`` installs both. The page rule (A4, margins, page numbers)
lives in the HTML template's ``@page`` block, so the browser's print dialog gives the same pages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


def write_pdf(html: str, out_path: Path) -> Path:
    """Print ``html`` (self-contained: inline CSS, data-URL images) to ``out_path`` as A4.

    Raises:
        ConfigError: WeasyPrint or Pango is missing; the message says how to install them.
    """
    try:
        from weasyprint import HTML
    except (ImportError, OSError) as exc:  # OSError: the Pango shared library is missing
        raise ConfigError(
            f"cannot print the report to PDF ({type(exc).__name__}: {exc}); "
            "install WeasyPrint and Pango: `pip install weasyprint` and `make sysdeps` (or set report.pdf: false)"
        ) from exc
    with atomic_path(Path(out_path)) as tmp:
        HTML(string=html, base_url=None).write_pdf(tmp)
    log.info("wrote %s", str(out_path))
    return Path(out_path)
