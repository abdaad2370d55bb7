"""Data safety of kernel stores: ntkit never removes or overwrites anything it cannot prove is a
store it created. Every refused path is refused with a message before anything is touched; the
user's files are checked byte for byte afterwards (Python API and CLI)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ntkit
from ntkit import layers as nl
from ntkit.cli import main
from ntkit.scale._store import LOCK, MARKER
from tests.scale._kernels import data, slow_rbf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = nl.serial(nl.Dense(8, W_std=1.3), nl.Relu(), nl.Dense(1))
ARCH_TEXT = "Dense(8, W_std=1.3), Relu(), Dense(1)"


def snapshot(root):
    """{relative path: bytes or 'dir' or ('link', target)} of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture()
def user_tree(tmp_path, monkeypatch):
    """cwd = tmp/home/work, full of user files; HOME = tmp/home; returns tmp_path."""
    home = tmp_path / "home"
    work = home / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "table.csv").write_text("a,b\n1,2\n")
    (work / "notes.txt").write_text("my notes")
    np.save(work / "x.npy", data(6, 2))
    (work / "zarrdata").mkdir()
    (work / "zarrdata" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (work / "legacy.zarr").mkdir()
    (work / "legacy.zarr" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"ntkit_kernel_store": 1}}))
    (work / "link_to_results").symlink_to(work / "results")
    (work / "link_to_file").symlink_to(work / "notes.txt")
    (work / "broken_link").symlink_to(work / "nowhere")
    (home / "dotfile").write_text("home file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


BAD = [("", "empty"), (".", "current directory"), ("..", "home directory"),
       ("../..", "parent of the current"), ("CWD", "current directory"),
       ("HOME", "home directory"), ("/", "root"),
       ("notes.txt", "existing file"), ("x.npy", "existing file"),
       ("results", "not an ntkit kernel store"), ("zarrdata", "not an ntkit kernel store"),
       ("legacy.zarr", "ownership marker"), ("link_to_results", "symbolic link"),
       ("link_to_file", "existing file"), ("broken_link", "broken symbolic link"),
       ("results/..", "current directory"), ("./", "current directory")]


def _resolve(p, tmp_path):
    return {"CWD": os.getcwd(), "HOME": str(tmp_path / "home")}.get(p, p)


@pytest.mark.parametrize("overwrite", [False, True])
def test_refused_store_paths_touch_nothing(user_tree, overwrite):
    before = snapshot(user_tree)
    for path, needle in BAD:
        with pytest.raises(ValueError, match=needle):
            ntkit.compute_kernel(ARCH, data(6, 2), store=_resolve(path, user_tree),
                                 overwrite=overwrite, progress=False)
        assert snapshot(user_tree) == before, path
    with pytest.raises(TypeError, match="store"):
        ntkit.compute_kernel(ARCH, data(6, 2), store=3, progress=False)
    with pytest.raises(ValueError, match="local"):
        ntkit.compute_kernel(ARCH, data(6, 2), store="s3://bucket/k.zarr", progress=False)
    assert snapshot(user_tree) == before


def test_dot_store_with_zarr_json_is_refused(user_tree):
    """The reported case: `store='.'` + overwrite in a folder holding a zarr.json."""
    (user_tree / "home" / "work" / "zarr.json").write_text('{"zarr_format": 3}')
    before = snapshot(user_tree)
    for path in (".", "", os.getcwd()):
        with pytest.raises(ValueError):
            ntkit.compute_kernel(ARCH, data(6, 2), store=path, overwrite=True, progress=False)
    assert snapshot(user_tree) == before


def test_overwrite_removes_only_our_entries(user_tree):
    x = data(8, 2)
    h = ntkit.compute_kernel(ARCH, x, get="ntk", store="k.zarr", tile=4, progress=False)
    assert (user_tree / "home" / "work" / "k.zarr" / MARKER).exists()
    assert not (user_tree / "home" / "work" / "k.zarr" / LOCK).exists()      # released
    sid = h.store_id
    keep = user_tree / "home" / "work" / "k.zarr" / "my_readme.txt"
    keep.write_text("user file inside the store folder")
    other = nl.serial(nl.Dense(8, W_std=0.7), nl.Relu(), nl.Dense(1))
    h2 = ntkit.compute_kernel(other, x, get="ntk", store="k.zarr", tile=4, progress=False,
                              overwrite=True)
    assert h2.store_id != sid and keep.read_text() == "user file inside the store folder"
    torch.testing.assert_close(h2.load("ntk"), other.kernel(x, get="ntk"), rtol=1e-12, atol=0)
    # a store folder that ntkit created but that is now a symlink target: followed, ours
    os.symlink("k.zarr", "alias.zarr")
    h3 = ntkit.compute_kernel(other, x, get="ntk", store="alias.zarr", progress=False)
    assert torch.equal(h3.load("ntk"), h2.load("ntk"))
    # an existing empty folder is fine (nothing to lose)
    os.mkdir("empty.zarr")
    assert ntkit.compute_kernel(ARCH, x, get="ntk", store="empty.zarr", progress=False) \
        .status().complete


def test_marker_missing_means_not_ours(user_tree):
    x = data(5, 2)
    ntkit.compute_kernel(ARCH, x, get="ntk", store="k.zarr", progress=False)
    os.remove(os.path.join("k.zarr", MARKER))
    before = snapshot(user_tree)
    for ow in (False, True):
        with pytest.raises(ValueError, match="ownership marker"):
            ntkit.compute_kernel(ARCH, x, get="ntk", store="k.zarr", overwrite=ow,
                                 progress=False)
    assert snapshot(user_tree) == before


# ---- command line --------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_refused_store_paths_touch_nothing(user_tree, one_error_line, overwrite):
    before = snapshot(user_tree)
    for path, needle in BAD:
        args = ["kernel", ARCH_TEXT, "x.npy", "--store", _resolve(path, user_tree),
                "--no-progress"] + (["--overwrite"] if overwrite else [])
        assert main(args) == 2, path
        err = one_error_line("kernel")
        assert "--store" in err and "Traceback" not in err, err
        assert needle in err, (path, err)     # the same reason as the API gives
        assert snapshot(user_tree) == before, path


def test_cli_empty_store_subprocess_exit_2_no_traceback(user_tree):
    before = snapshot(user_tree)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ntkit.cli", "kernel", ARCH_TEXT, "x.npy",
                        "--store", "", "--overwrite", "--no-progress"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "--store" in p.stderr and "empty" in p.stderr
    assert snapshot(user_tree) == before


def test_in_memory_store_and_store_none_unaffected(user_tree):
    before = snapshot(user_tree)
    h = ntkit.compute_kernel(slow_rbf, data(9, 2), store=None, tile=4, progress=False)
    assert h.status().complete and snapshot(user_tree) == before
