"""Self-contained HTML reports: text, tables and figures (embedded as base64 PNG) in one file.

The page has no scripts and loads nothing from the network, so it opens anywhere (a browser,
a CI artifact viewer, an e-mail attachment) and can be archived as is.

Example::

    >>> from ntkit.report import Report
    >>> rep = Report("Lazy training on digits")
    >>> rep.heading("Scaling with width"); rep.text("kappa falls like 1/width ...")
    >>> rep.table([{"width": 64, "kappa": 0.1}, {"width": 256, "kappa": 0.03}])
    >>> rep.figure(sweep.plot(), "fitted log-log slopes")
    >>> rep.save("report.html")
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import math
from typing import Any, List, Optional, Sequence

__all__ = ["Report", "figure_to_base64"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
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
"""


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

    def heading(self, text: str) -> "Report":
        self._parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> "Report":
        for para in str(text).strip().split("\n\n"):
            self._parts.append(f"<p>{html.escape(para)}</p>")
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
        """Embed a matplotlib figure (base64 PNG by default, or inline-able SVG as base64)."""
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
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{sub}"
                f"<p class='meta'>ntkit {html.escape(__version__)}, generated {stamp}</p>\n"
                + "\n".join(self._parts) + "\n</body></html>\n")

    def save(self, path: str) -> str:
        """Write the page to ``path`` (UTF-8); returns ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        return str(path)

