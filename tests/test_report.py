"""The HTML report is self-contained (no scripts, no external resources, figures embedded) and
opens in a real headless browser with every image decoded (skipped if no chromium is found)."""
import base64
import os
import re
import shutil
import subprocess

import pytest

from ntkit.report import Report

matplotlib = pytest.importorskip("matplotlib")


def _works(path):
    """A browser binary that actually runs (Ubuntu's snap stubs for chromium do not)."""
    try:
        return subprocess.run([path, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _browser():
    names = [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")]
    for path in [p for p in names if p] + ["/usr/bin/chromium"]:
        if os.path.exists(path) and _works(path):
            return path
    return None


_CHECK = """<script>
window.addEventListener('error', e => document.body.setAttribute('data-error', String(e.message)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-check', imgs.length + ':' + ok);
});
</script>"""


def open_in_browser(html_path, tmp_path):
    """Load the page in headless chromium; returns (n_images, n_decoded, error or None). A copy
    with a checker script is loaded (the report itself has no scripts)."""
    exe = _browser()
    if exe is None:
        pytest.skip("no headless chromium found (apt-get install -y chromium)")
    text = open(html_path, encoding="utf-8").read()
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-check="(\d+):(\d+)"', r.stdout)
    assert m, f"page did not finish loading: {r.stdout[:500]}"
    err = re.search(r'data-error="([^"]*)"', r.stdout)
    assert "Failed to load resource" not in r.stderr     # nothing fetched from outside
    return int(m.group(1)), int(m.group(2)), err.group(1) if err else None


def assert_self_contained(text):
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.search(r'(src|href)\s*=\s*"(https?:|//|file:)', text)
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    for s in srcs:
        head, data = s.split(",", 1)
        raw = base64.b64decode(data)
        if head.startswith("data:image/png"):
            assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        elif head.startswith("data:image/gif"):
            assert raw[:3] == b"GIF"
    return srcs


def small_report(tmp_path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([1, 2, 3], [1, 4, 9])
    rep = Report("Test <report> & co", "subtitle")
    rep.heading("Section <1>").text("a < b & c > d\n\nsecond paragraph")
    rep.table([{"name": "x<y", "value": 1.5, "small": 1e-6, "none": None}])
    rep.table([[1, 2.0]], columns=["a", "b"], caption="by rows")
    rep.figure(fig, "a parabola")
    rep.code("x = 1 < 2")
    return rep.save(str(tmp_path / "r.html"))


def test_report_is_self_contained_and_escaped(tmp_path):
    path = small_report(tmp_path)
    text = open(path, encoding="utf-8").read()
    assert len(assert_self_contained(text)) == 1
    assert "Test &lt;report&gt; &amp; co" in text and "a &lt; b &amp; c &gt; d" in text
    assert "x&lt;y" in text and "1.000e-06" in text and text.count("<p>") >= 3
    assert "Figure 1. a parabola" in text


def test_report_opens_in_headless_browser(tmp_path):
    path = small_report(tmp_path)
    n, ok, err = open_in_browser(path, tmp_path)
    assert (n, ok, err) == (1, 1, None)


def test_report_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="title"):
        Report("")
    rep = Report("t")
    with pytest.raises(ValueError, match="rows"):
        rep.table([])
    with pytest.raises(ValueError, match="columns"):
        rep.table([[1, 2]])
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="image"):
        rep.image(str(tmp_path / "a.bmp"))


# ---- readability: text size as rendered on the page ----------------------------------------
def test_smallest_text_px_matches_closed_form():
    from matplotlib.figure import Figure
    from ntkit.report import PAGE_WIDTH_PX, smallest_text_px
    # narrow figure, shown at its own size: points / 72 * dpi
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.tick_params(labelsize=11)
    ax.set_title("t", fontsize=12)
    ax.text(0.5, 0.5, "small", fontsize=9)
    assert smallest_text_px(fig, dpi=100) == pytest.approx(9 / 72 * 100)
    # wider than the page: scaled down by PAGE_WIDTH_PX / (width * dpi)
    wide = Figure(figsize=(16, 3))
    wide.subplots().text(0.5, 0.5, "x", fontsize=9)
    for t in wide.axes[0].get_xticklabels() + wide.axes[0].get_yticklabels():
        t.set_fontsize(20)
    wide.axes[0].tick_params(labelsize=20)
    assert smallest_text_px(wide, dpi=100) == pytest.approx(9 / 72 * 100 * PAGE_WIDTH_PX / 1600)
    assert smallest_text_px(Figure(figsize=(2, 2))) == float("inf")     # no text at all


def test_report_records_text_size_of_each_figure():
    from matplotlib.figure import Figure
    rep = Report("t")
    for fs, width in ((6, 4), (10, 4)):
        fig = Figure(figsize=(width, 2))
        ax = fig.subplots()
        ax.tick_params(labelsize=fs)
        rep.figure(fig)
    assert rep.text_px == pytest.approx([6 / 72 * 100, 10 / 72 * 100])


def test_plural():
    from ntkit._text import plural
    assert [plural(n, "hidden layer") for n in (0, 1, 2)] == [
        "0 hidden layers", "1 hidden layer", "2 hidden layers"]
    assert plural(1, "alpha", "alphas") == "1 alpha" and plural(3, "x", "xs") == "3 xs"


# ---- saving never loses a file ntkit did not write -------------------------------------------
def test_save_replaces_only_ntkit_reports(tmp_path):
    from ntkit.report import is_ntkit_report
    path = tmp_path / "r.html"
    Report("first").save(str(path))
    assert is_ntkit_report(str(path)) and "first" in path.read_text(encoding="utf-8")
    Report("second").save(str(path))                        # ours: replaced
    assert "second" in path.read_text(encoding="utf-8")
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my own notes</html>")
    with pytest.raises(ValueError, match="overwrite=True"):
        Report("x").save(str(foreign))
    assert foreign.read_text() == "<html>my own notes</html>"
    assert not is_ntkit_report(str(foreign))
    Report("forced").save(str(foreign), overwrite=True)
    assert "forced" in foreign.read_text(encoding="utf-8")
    folder = tmp_path / "dir.html"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        Report("x").save(str(folder), overwrite=True)
    link = tmp_path / "link.html"
    link.symlink_to(path)
    with pytest.raises(ValueError, match="not a regular file"):
        Report("x").save(str(link), overwrite=True)
    assert "second" in path.read_text(encoding="utf-8")       # the link's target untouched
    with pytest.raises(ValueError, match="folder does not exist"):
        Report("x").save(str(tmp_path / "missing" / "r.html"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dir.html", "link.html", "notes.html", "r.html"]      # no temporary file left behind
