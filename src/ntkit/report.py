"""Self-contained HTML reports: text, tables and figures (embedded as base64 PNG) in one file.

The page has no scripts and loads nothing from the network, so it opens anywhere (a browser,
a CI artifact viewer, an e-mail attachment) and can be archived as is.

Readability: the page's text column is :data:`PAGE_WIDTH_PX` CSS pixels wide and a figure
embedded at ``dpi`` is shown at ``min(width_in * dpi, PAGE_WIDTH_PX)`` pixels, so its text
renders at ``points / 72 * dpi * scale`` pixels; :func:`smallest_text_px` computes that for
the smallest visible text of a figure, and :meth:`Report.figure` records it
(``Report.text_px``) so a test can hold every figure to :data:`MIN_TEXT_PX`.

Saving never loses a file ntkit did not write: :meth:`Report.save` replaces an existing file
only if it is an ntkit report (it carries ``<meta name="generator" content="ntkit ...">``,
see :func:`is_ntkit_report`) or ``overwrite=True``, and writes through a temporary file.

Example::

    >>> from ntkit.report import Report
    >>> rep = Report("Lazy training on digits")
    >>> rep.heading("Scaling with width"); rep.text("kappa falls like 1/width ...")
    >>> rep.table([{"width": 64, "kappa": 0.1}, {"width": 256, "kappa": 0.03}])
    >>> rep.figure(plots.plot_scaling(sweep), "fitted log-log slopes")
    >>> rep.save("report.html")
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from typing import Any, List, Optional, Sequence

from ._files import write_atomic

__all__ = ["Report", "figure_to_base64", "smallest_text_px", "is_ntkit_report",
           "PAGE_WIDTH_PX", "MIN_TEXT_PX"]

#: width of the page's text column in CSS pixels (``max-width`` in the page's style)
PAGE_WIDTH_PX = 1100
#: smallest text, in CSS pixels, that a figure of the report should show at the page's width
MIN_TEXT_PX = 9.0
_GENERATOR = '<meta name="generator" content="ntkit'

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:PAGEpx;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.85em}
.meta{color:#777;font-size:.85em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
""".replace("PAGE", str(PAGE_WIDTH_PX))


def smallest_text_px(fig, dpi: float = 100, page_px: float = PAGE_WIDTH_PX) -> float:
    """Size in CSS pixels of the smallest visible text of ``fig`` (titles, labels, tick
    labels, legends, annotations) when it is rendered at ``dpi`` and shown in a column
    ``page_px`` pixels wide (images wider than the column are scaled down to it).

    ``inf`` for a figure without text. Example: ``smallest_text_px(fig) >= MIN_TEXT_PX``.
    """
    from matplotlib.text import Text
    if fig.canvas is None or type(fig.canvas).__name__ == "FigureCanvasBase":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.canvas.draw()                     # lays out; tick labels exist only after a draw
    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip()]
    if not sizes:
        return math.inf
    width_px = fig.get_figwidth() * dpi
    scale = min(1.0, page_px / width_px)
    return min(sizes) / 72.0 * dpi * scale


def is_ntkit_report(path: str) -> bool:
    """Whether ``path`` is a regular file written by :meth:`Report.save` (its generator mark)."""
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return _GENERATOR.encode() in head


def figure_to_base64(fig, fmt: str = "png", dpi: int = 100) -> str:
    """Render a matplotlib figure to a base64 string (``png`` or ``svg``)."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"`fmt` must be 'png' or 'svg', got {fmt!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if v is None:
        return "–"
    return html.escape(str(v))


class Report:
    """An HTML report built section by section; :meth:`save` writes one self-contained file.

    Methods add, in order: :meth:`heading`, :meth:`text` (paragraph, escaped), :meth:`code`
    (preformatted), :meth:`table` (list of dicts or of rows), :meth:`figure` (matplotlib figure,
    embedded). :meth:`to_html` returns the page as a string.
    """

    def __init__(self, title: str, subtitle: Optional[str] = None):
        if not isinstance(title, str) or not title.strip():
            raise ValueError("`title` must be a non-empty string")
        self.title = title
        self.subtitle = subtitle
        self._parts: List[str] = []
        self.n_figures = 0
        #: rendered size (CSS px, :func:`smallest_text_px`) of each figure's smallest text
        self.text_px: List[float] = []

    def heading(self, text: str) -> "Report":
        self._parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        for para in str(text).strip().split("\n\n"):
            self._parts.append(f"<p>{html.escape(para)}</p>")
        return self

    def note(self, text: str) -> "Report":
        """A highlighted paragraph (a caveat the reader must not miss)."""
        self._parts.append(f"<p class='note'>{html.escape(str(text))}</p>")
        return self

    def code(self, text: str) -> "Report":
        self._parts.append(f"<pre>{html.escape(str(text))}</pre>")
        return self

    def table(self, rows: Sequence[Any], columns: Optional[Sequence[str]] = None,
              caption: Optional[str] = None) -> "Report":
        """Rows as dicts (columns from the first row unless given) or as sequences (then
        ``columns`` names them)."""
        rows = list(rows)
        if not rows:
            raise ValueError("`rows` is empty: nothing to tabulate")
        if isinstance(rows[0], dict):
            cols = list(columns) if columns is not None else list(rows[0])
            body = [[r.get(c) for c in cols] for r in rows]
        else:
            if columns is None:
                raise ValueError("`columns` is required when rows are sequences")
            cols = list(columns)
            body = [list(r) for r in rows]
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>")
        for r in body:
            cells = "".join(
                f"<td class='l'>{_cell(v)}</td>" if isinstance(v, str) else f"<td>{_cell(v)}</td>"
                for v in r)
            out.append(f"<tr>{cells}</tr>")
        out.append("</table>")
        self._parts.append("\n".join(out))
        return self

    def figure(self, fig, caption: str = "", fmt: str = "png", dpi: int = 100) -> "Report":
        """Embed a matplotlib figure (base64 PNG by default, or inline-able SVG as base64), shown
        at ``min(width_in * dpi, PAGE_WIDTH_PX)`` pixels; its smallest text size there is
        appended to :attr:`text_px`."""
        self.text_px.append(smallest_text_px(fig, dpi))
        data = figure_to_base64(fig, fmt, dpi)
        mime = "image/png" if fmt == "png" else "image/svg+xml"
        self.n_figures += 1
        alt = html.escape(caption or f"figure {self.n_figures}")
        self._parts.append(
            f"<figure><img alt=\"{alt}\" src=\"data:{mime};base64,{data}\"/>"
            f"<figcaption>Figure {self.n_figures}. {html.escape(caption)}</figcaption></figure>")
        return self

    def image(self, path: str, caption: str = "") -> "Report":
        """Embed an image file (``.png``, ``.gif``, ``.svg``, ``.jpg``), e.g. an animation."""
        ext = str(path).rsplit(".", 1)[-1].lower()
        mimes = {"png": "image/png", "gif": "image/gif", "svg": "image/svg+xml",
                 "jpg": "image/jpeg", "jpeg": "image/jpeg"}
        if ext not in mimes:
            raise ValueError(f"`path` must be a .png, .gif, .svg or .jpg image, got {path!r}")
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        self.n_figures += 1
        alt = html.escape(caption or f"figure {self.n_figures}")
        self._parts.append(
            f"<figure><img alt=\"{alt}\" src=\"data:{mimes[ext]};base64,{data}\"/>"
            f"<figcaption>Figure {self.n_figures}. {html.escape(caption)}</figcaption></figure>")
        return self

    def to_html(self) -> str:
        from . import __version__
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        sub = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
                f"{_GENERATOR} {html.escape(__version__)}\"/>"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{sub}"
                f"<p class='meta'>ntkit {html.escape(__version__)}, generated {stamp}</p>\n"
                + "\n".join(self._parts) + "\n</body></html>\n")

    def save(self, path: str, *, overwrite: bool = False) -> str:
        """Write the page to ``path`` (UTF-8) through a temporary file; returns ``path``.

        An existing ``path`` is replaced only if it is an ntkit report
        (:func:`is_ntkit_report`) or ``overwrite=True``; a folder, link or special file never.
        """
        path = os.fspath(path)
        if not isinstance(path, str) or not path.strip():
            raise ValueError("`path` is empty; name an .html file")
        full = os.path.abspath(path)
        if not os.path.isdir(os.path.dirname(full)):
            raise ValueError(f"`path` {path}: folder does not exist: {os.path.dirname(full)}")
        existed = os.path.lexists(full)
        if existed:
            if os.path.islink(full) or not os.path.isfile(full):
                raise ValueError(f"`path` {path} exists and is not a regular file (a folder, "
                                 f"link or device); choose another path")
            if not overwrite and not is_ntkit_report(full):
                raise ValueError(f"`path` {path} already exists and is not an ntkit report; "
                                 f"pass overwrite=True to replace it, or choose another path")
        page = self.to_html().encode("utf-8")
        write_atomic(full, "`path`", lambda f: f.write(page), replace=existed)
        return str(path)

