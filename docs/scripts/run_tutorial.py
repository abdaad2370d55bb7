"""Execute one tutorial page and write the rendered Markdown and its figures.

Usage::

    python docs/scripts/run_tutorial.py docs/tutorials/01-mlp-ntk.md OUT_DIR [--fig-prefix P]

A tutorial is an ordinary Markdown page whose executable code blocks are fenced as
```` ```python exec ````. The blocks run top to bottom in ONE namespace (like a notebook) with
``__name__ == '__main__'``, so code guarded by ``if __name__ == '__main__':`` (Dask clusters)
runs too. After each block:

* what it printed is shown below the code in a ``text`` block (or inserted as Markdown when
  the fence says ``python exec md``);
* every open pyplot figure, and every matplotlib ``Figure`` a name in the namespace points
  to that was not saved before, is saved as ``OUT_DIR/<prefix>-<block>-<k>.png`` (100 dpi),
  embedded as ``figures/<name>`` (relative to the page) and closed.

Fence options (space separated after ``python exec``): ``md`` (output is Markdown), ``hide``
(run but do not show the source). Writes ``OUT_DIR/page.md`` (the rendered Markdown),
``OUT_DIR/script.py`` (all executed code, runnable on its own) and the PNGs. Exits non-zero
with the traceback when a block raises, so the docs build fails loudly.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import traceback

FENCE = re.compile(r"^```python exec(?P<opts>[^\n]*)\n(?P<code>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def split_blocks(text: str):
    """``[(kind, payload)]`` with kind ``'md'`` (str) or ``'code'`` ((code, options))."""
    out, pos = [], 0
    for m in FENCE.finditer(text):
        out.append(("md", text[pos:m.start()]))
        out.append(("code", (m.group("code"), set(m.group("opts").split()))))
        pos = m.end()
    out.append(("md", text[pos:]))
    return out


def _save_figures(out_dir: str, prefix: str, block: int, ns: dict, done: list):
    """Save every open pyplot figure (then close it) and every matplotlib ``Figure`` bound to a
    name in ``ns`` that was not saved before (e.g. returned by ``plots.plot_scaling(sweep)``); return
    ``[(file name, alt text)]``. ``done`` keeps the saved figures (so ids are not reused)."""
    if "matplotlib" not in sys.modules:
        return []
    from matplotlib.figure import Figure
    figs = []
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        figs = [plt.figure(num) for num in plt.get_fignums()]
    figs += [v for v in list(ns.values()) if isinstance(v, Figure)]
    seen = {id(f) for f in done}
    saved = []
    for fig in figs:
        if id(fig) in seen:
            continue
        seen.add(id(fig))
        done.append(fig)
        alt = fig._suptitle.get_text() if fig._suptitle is not None else ""
        if not alt:
            alt = next((ax.get_title() for ax in fig.axes if ax.get_title()),
                       f"figure {len(saved) + 1}")
        name = f"{prefix}-{block:02d}-{len(saved)}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=100, bbox_inches="tight")
        if "matplotlib.pyplot" in sys.modules:
            import matplotlib.pyplot as plt
            plt.close(fig)
        saved.append((name, alt.replace("[", "(").replace("]", ")").replace("\n", " ")))
    return saved


def run(src: str, out_dir: str, prefix: str) -> str:
    os.environ.setdefault("MPLBACKEND", "Agg")
    with open(src, encoding="utf-8") as f:
        text = f.read()
    os.makedirs(out_dir, exist_ok=True)
    ns = {"__name__": "__main__", "__file__": os.path.abspath(src)}
    rendered, script = [], [f"# Code of the tutorial {os.path.basename(src)} (ntkit docs).\n"]
    block = 0
    done: list = []                 # figures already saved
    t_start = time.perf_counter()
    for kind, payload in split_blocks(text):
        if kind == "md":
            rendered.append(payload)
            continue
        code, opts = payload
        block += 1
        if "hide" not in opts:
            rendered.append(f"```python\n{code}```\n")
        script.append(code)
        buf = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f"<{os.path.basename(src)} block {block}>", "exec"), ns)
        except BaseException:
            sys.stderr.write(f"\n{src}: code block {block} raised:\n")
            sys.stderr.write(code)
            sys.stderr.write("\n" + traceback.format_exc())
            sys.stderr.write(f"\noutput so far:\n{buf.getvalue()}\n")
            raise SystemExit(1)
        sys.stderr.write(f"{os.path.basename(src)}: block {block} "
                         f"{time.perf_counter() - t0:.1f} s\n")
        out = buf.getvalue()
        if out.strip():
            if "md" in opts:
                rendered.append("\n" + out.strip("\n") + "\n\n")
            else:
                rendered.append("```text\n" + out.rstrip("\n").replace("```", "` ` `")
                                + "\n```\n")
        for name, alt in _save_figures(out_dir, prefix, block, ns, done):
            rendered.append(f"\n![{alt}](figures/{name})\n\n")
    quick = os.environ.get("NTKIT_DOCS_QUICK", "") not in ("", "0")
    rendered.append(f"\n---\n*Executed when this site was built ({'quick' if quick else 'full'} "
                    f"mode, {time.perf_counter() - t_start:.0f} s).*\n")
    with open(os.path.join(out_dir, "page.md"), "w", encoding="utf-8") as f:
        f.write("".join(rendered))
    with open(os.path.join(out_dir, "script.py"), "w", encoding="utf-8") as f:
        f.write("\n".join(script))
    return os.path.join(out_dir, "page.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--fig-prefix", default="fig")
    a = p.parse_args(argv)
    run(a.src, a.out_dir, a.fig_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
