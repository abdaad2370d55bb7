"""The documentation site: quick build with every tutorial executed, figures embedded, the API
reference generated, the neural-tangents translation table importable, and a built page
rendered by a headless browser.

The build runs ``mkdocs build --strict`` in quick mode (``NTKIT_DOCS_QUICK=1``) once per test
session into a temporary folder; it needs the ``docs`` extra (mkdocs-material,
mkdocstrings[python]) and is skipped without it. The browser test needs ``chromium`` (or
``chromium-browser`` / ``google-chrome``) and is skipped without it.
"""
from __future__ import annotations

import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
TABLE_PAGE = DOCS / "tutorials" / "07-from-neural-tangents.md"
API_MODULES = ("layers", "predict", "empirical", "scale", "estimators", "features",
               "diagnostics", "data")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted``, then follow attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


def _table_names(text: str):
    """Code spans ``ntkit.x.y`` in the ntkit column (2nd) of the page's Markdown tables."""
    names = set()
    for line in text.splitlines():
        if line.startswith("| ") and line.count("|") >= 4:
            names.update(re.findall(r"`(ntkit(?:\.\w+)+)`", line.split("|")[2]))
    return sorted(names)


def _images(page: Path):
    """``src`` of every ``<img>`` in a built HTML page."""
    return [html.unescape(s) for s in re.findall(r'<img[^>]*\ssrc="([^"]+)"',
                                                 page.read_text(encoding="utf-8"))]


def _page(site: Path, md: Path) -> Path:
    return site / "tutorials" / md.stem / "index.html"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "NTKIT_DOCS_SKIP_EXEC"}
    env.update(NO_MKDOCS_2_WARNING="1", **extra)
    return env


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--virtual-time-budget=5000"]


# ---------------------------------------------------------------------------------------
# no build needed
# ---------------------------------------------------------------------------------------

def test_translation_table_names_exist():
    """Every ntkit name of the neural-tangents translation table imports."""
    names = _table_names(TABLE_PAGE.read_text(encoding="utf-8"))
    assert len(names) >= 30, names
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, "names in the translation table that do not exist:\n" + "\n".join(missing)


def test_table_parser_catches_a_missing_name():
    """The check above can fail: a made-up name does not resolve."""
    names = _table_names("| `stax.Foo` | `ntkit.layers.NoSuchLayer` | x |\n")
    assert names == ["ntkit.layers.NoSuchLayer"]
    with pytest.raises(AttributeError):
        _resolve(names[0])


def test_every_tutorial_is_in_the_nav_and_executes_code():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert len(TUTORIALS) == 7
    for md in TUTORIALS:
        assert f"tutorials/{md.name}" in nav, f"{md.name} is not in mkdocs.yml's nav"
        text = md.read_text(encoding="utf-8")
        assert "```python exec" in text, f"{md.name} has no executed code block"
        if md.name != TABLE_PAGE.name:          # the translation page has no sizes to shrink
            assert "NTKIT_DOCS_QUICK" in text, f"{md.name} has no quick mode"


def test_a_failing_tutorial_fails_the_build(tmp_path):
    """The hook executes tutorial code and turns an exception into a failed build."""
    pytest.importorskip("mkdocs", reason="the docs build needs the 'docs' extra")
    (tmp_path / "docs" / "tutorials").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text("# x\n")
    (tmp_path / "docs" / "tutorials" / "bad.md").write_text(
        "# Bad\n\n```python exec\nprint('before')\nraise RuntimeError('boom 1234')\n```\n")
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\nhooks:\n  - " + str(DOCS / "scripts" / "mkdocs_hooks.py") + "\n")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode != 0
    assert "boom 1234" in proc.stderr and "tutorials/bad.md" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# the quick build
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod, reason="the docs build needs the 'docs' extra: "
                                        "pip install -e '.[docs]'")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("site")
    env = _env(NTKIT_DOCS_QUICK="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    return out


def test_tutorial_pages_embed_their_figures(site):
    for md in TUTORIALS:
        page = _page(site, md)
        assert page.is_file(), f"{md.name} was not built"
        text = page.read_text(encoding="utf-8")
        assert "Traceback" not in text, f"{md.name} shows a traceback"
        assert "quick mode" in text, f"{md.name} does not say it was executed (quick mode)"
        figs = [s for s in _images(page) if s.endswith(".png")]
        assert figs, f"{md.name} embeds no figure"
        for src in figs:
            png = (page.parent / src).resolve()
            assert png.is_file(), f"{md.name}: {src} missing"
            data = png.read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 5000, \
                f"{md.name}: {src} is not a PNG figure"
        script = site / "tutorials" / "scripts" / f"{md.stem}.py"
        assert script.is_file() and script.stat().st_size > 0, f"no script for {md.name}"
        compile(script.read_text(encoding="utf-8"), str(script), "exec")


def test_tutorial_outputs_were_executed(site):
    """Numbers printed by the code are on the pages (spot checks of each result)."""
    def text(stem):
        return html.unescape(re.sub(r"<[^>]+>", "", _page(site, DOCS / "tutorials" /
                                                             f"{stem}.md").read_text()))
    assert re.search(r"fitted slope, single networks: -0\.\d+", text("01-mlp-ntk"))
    assert re.search(r"CNTK-V\s+test accuracy", text("02-cntk-cifar10"))
    assert "max |sum of mode losses - gradient-flow loss|" in text("03-dynamics")
    assert re.search(r"kappa\s+-1\.000", text("04-lazy-training"))
    assert "bitwise identical to the thread-pool result: True" in text("05-scale")
    assert re.search(r"NTK-SVM \d+\.\d+%", text("06-estimators-uci"))
    assert re.search(r"all \d+ ntkit names of the translation table resolve",
                     text("07-from-neural-tangents"))


def test_api_reference_lists_the_public_names(site):
    for mod in API_MODULES:
        page = site / "api" / mod / "index.html"
        assert page.is_file(), f"no API page for ntkit.{mod}"
        text = page.read_text(encoding="utf-8")
        public = importlib.import_module(f"ntkit.{mod}").__all__
        missing = [n for n in public if f'id="ntkit.{mod}.{n}"' not in text]
        assert not missing, f"ntkit.{mod}: no API entry for {missing}"


def test_browser_renders_a_tutorial_with_its_figures(site, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/google-chrome on PATH (CI installs chromium with apt-get)")
    page = _page(site, TUTORIALS[0])
    # 1. the page's DOM, after the theme's scripts ran, still holds its figures
    dom = subprocess.run([browser, *BROWSER_FLAGS, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    figs = [s for s in re.findall(r'<img[^>]*\ssrc="([^"]+\.png)"', dom.stdout)]
    assert len(figs) >= 3, f"rendered DOM has {len(figs)} figures"
    # 2. the browser decodes every figure of the page (naturalWidth > 0 after load)
    probe = tmp_path / "probe.html"
    tags = "".join(f'<img src="{(page.parent / html.unescape(s)).resolve().as_uri()}">'
                   for s in figs)
    probe.write_text(
        "<html><body>" + tags + "<pre id='out'></pre><script>"
        "window.onload = () => { document.getElementById('out').textContent = "
        "'SIZES ' + [...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight)"
        ".join(' '); };</script></body></html>", encoding="utf-8")
    res = subprocess.run([browser, *BROWSER_FLAGS, "--allow-file-access-from-files",
                          "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"SIZES ([^<]*)", res.stdout)
    assert m, f"probe page did not report image sizes:\n{res.stdout[-2000:]}"
    sizes = [tuple(int(v) for v in s.split("x")) for s in m.group(1).split()]
    assert len(sizes) == len(figs) and all(w > 100 and h > 100 for w, h in sizes), sizes
    # 3. a screenshot of the page is not blank
    shot = tmp_path / "page.png"
    subprocess.run([browser, *BROWSER_FLAGS, f"--screenshot={shot}", "--window-size=1280,2400",
                    page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20000, "screenshot missing or blank"
    keep = os.environ.get("NTKIT_DOCS_SCREENSHOT")
    if keep:                                   # to look at it: NTKIT_DOCS_SCREENSHOT=/tmp/x.png
        shutil.copyfile(shot, keep)
