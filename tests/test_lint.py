"""ruff (configured in pyproject.toml, ``[tool.ruff]``) finds nothing in the package, so CI, which
runs pytest, enforces it. Skipped where ruff is not installed (it comes with ``.[test]``)."""
import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff():
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return [exe]


def test_ruff_finds_nothing_in_the_package():
    r = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", "src"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (f"`ruff check src` (rules: [tool.ruff] in pyproject.toml):\n"
                               f"{r.stdout}{r.stderr}")
