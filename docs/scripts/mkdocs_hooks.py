"""MkDocs hook: execute the tutorials when the site is built.

Registered in ``mkdocs.yml`` (``hooks: [docs/scripts/mkdocs_hooks.py]``). Before pages are
rendered (``on_files``), every page under ``tutorials/`` that contains a ```` ```python exec ````
block is executed in its own Python process by ``run_tutorial.py`` (several at once, see
``NTKIT_DOCS_JOBS``); its figures become files of the site (``tutorials/figures/*.png``), its
code a downloadable script (``tutorials/scripts/<page>.py``), and the page's Markdown is
replaced by the executed version (``on_page_markdown``). A tutorial that raises fails the build
with its traceback.

Environment:
  NTKIT_DOCS_QUICK=1    small sizes in every tutorial (CI; the whole build in a few minutes).
  NTKIT_DOCS_JOBS=N     tutorials run in parallel (default: min(2, CPU count)).
  NTKIT_DOCS_TIMEOUT=S  per-tutorial time limit in seconds (default 1800).
  NTKIT_DOCS_SKIP_EXEC=1  do not execute (the pages show their code only; for editing prose).
  NTKIT_DOCS_STRICT_DOCSTRINGS=1  keep griffe's docstring-layout warnings as warnings (so that
                        ``--strict`` fails on them). By default they are logged as INFO, prefixed
                        "docstring layout:": a continuation line griffe cannot attach to a
                        parameter renders slightly off but is not an error in the docs.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.ntkit_tutorials")
HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "run_tutorial.py")
_RENDERED: dict = {}          # src_uri -> executed Markdown
_TMP: list = []               # keeps the temporary folders alive for the build


class _DocstringLayoutFilter(logging.Filter):
    """Demote griffe's docstring-layout warnings (not errors of the docs) to INFO."""

    PATTERNS = ("Failed to get 'name: description' pair", "does not appear in the function "
                "signature", "No type or annotation for")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and any(p in record.getMessage()
                                                     for p in self.PATTERNS):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "docstring layout: " + record.getMessage(), ()
        return True


if os.environ.get("NTKIT_DOCS_STRICT_DOCSTRINGS", "") in ("", "0"):
    logging.getLogger("mkdocs.plugins.griffe").addFilter(_DocstringLayoutFilter())


def _is_tutorial(f: File) -> bool:
    if not (f.src_uri.startswith("tutorials/") and f.src_uri.endswith(".md")):
        return False
    with open(f.abs_src_path, encoding="utf-8") as fh:
        return "```python exec" in fh.read()


def _env(jobs: int) -> dict:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(k, threads)
    env.setdefault("TQDM_DISABLE", "1")
    return env


def _run_one(f: File, out_dir: str, cwd: str, env: dict, timeout: float):
    stem = os.path.splitext(os.path.basename(f.src_uri))[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, RUNNER, f.abs_src_path, out_dir, "--fig-prefix", stem],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return f, None, f"timed out after {timeout:.0f} s\n{e.stderr or ''}", 0.0
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        return f, None, (p.stderr or "")[-6000:] + (p.stdout or "")[-2000:], dt
    return f, out_dir, p.stderr, dt


def on_files(files, config, **kwargs):
    tutorials = [f for f in files.documentation_pages() if _is_tutorial(f)]
    if not tutorials or os.environ.get("NTKIT_DOCS_SKIP_EXEC", "") not in ("", "0"):
        return files
    jobs = int(os.environ.get("NTKIT_DOCS_JOBS", min(2, os.cpu_count() or 1)))
    timeout = float(os.environ.get("NTKIT_DOCS_TIMEOUT", 1800))
    cwd = os.path.dirname(os.path.abspath(config.config_file_path))
    tmp = tempfile.TemporaryDirectory(prefix="ntkit-docs-")
    _TMP.append(tmp)
    env = _env(jobs)
    quick = env.get("NTKIT_DOCS_QUICK", "") not in ("", "0")
    log.info("executing %d tutorials (%s mode, %d at a time)", len(tutorials),
             "quick" if quick else "full", jobs)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(_run_one, f, os.path.join(tmp.name, str(i)), cwd, env, timeout)
                for i, f in enumerate(tutorials)]
        results = [fu.result() for fu in futs]
    failed = [(f, err) for f, out, err, _ in results if out is None]
    if failed:
        msg = "\n\n".join(f"tutorial {f.src_uri} failed:\n{err}" for f, err in failed)
        raise PluginError(msg)
    for f, out_dir, _, dt in results:
        log.info("tutorial %s executed in %.1f s", f.src_uri, dt)
        with open(os.path.join(out_dir, "page.md"), encoding="utf-8") as fh:
            md = fh.read()
        stem = os.path.splitext(os.path.basename(f.src_uri))[0]
        folder = os.path.dirname(f.src_uri)
        for name in sorted(os.listdir(out_dir)):
            if name.endswith(".png"):
                files.append(File.generated(config, f"{folder}/figures/{name}",
                                            abs_src_path=os.path.join(out_dir, name)))
        files.append(File.generated(config, f"{folder}/scripts/{stem}.py",
                                    abs_src_path=os.path.join(out_dir, "script.py")))
        md = _add_download_link(md, f"scripts/{stem}.py")
        _RENDERED[f.src_uri] = md
    return files


def _add_download_link(md: str, href: str) -> str:
    """After the page's first heading, a line linking the page's code as one script."""
    line = (f"\n[Download this tutorial's code]({href}) · set `NTKIT_DOCS_QUICK=1` for the "
            "small sizes used in CI.\n")
    m = re.search(r"^# .*$", md, re.MULTILINE)
    if not m:
        return line + md
    return md[:m.end()] + "\n" + line + md[m.end():]


def on_page_markdown(markdown, page, config, files, **kwargs):
    return _RENDERED.get(page.file.src_uri, markdown)
