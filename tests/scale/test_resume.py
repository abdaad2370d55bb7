"""Crash safety: a real SIGKILL mid-computation, then resume -> bitwise the uninterrupted result;
a store written by a different computation is refused."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ntkit
from ntkit.scale import open_store
from tests.scale import _kernels
from tests.scale._kernels import data, slow_rbf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, TILE = 40, 4                     # 10 x 10 tiles, 55 in the upper triangle


def _spawn(store, env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "tests.scale._kill_script", str(store),
                             str(N), str(TILE)], cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process) and an independent dense oracle."""
    p = tmp_path_factory.mktemp("ref") / "ref.zarr"
    h = ntkit.compute_kernel(slow_rbf, data(N), store=str(p), tile=TILE, progress=False)
    k = h.load("kernel")
    x = torch.from_numpy(data(N))
    np.testing.assert_allclose(k.numpy(), slow_rbf(x, x).numpy(), rtol=1e-12, atol=1e-12)
    return k


def _resume_and_check(store, reference):
    before = open_store(str(store)).status()
    assert 0 < before.done < before.total, before
    _kernels.CALLS.clear()
    h = ntkit.compute_kernel(slow_rbf, data(N), store=str(store), tile=TILE, progress=False)
    assert len(_kernels.CALLS) == before.total - before.done      # only the missing tiles
    assert h.status().complete
    assert torch.equal(h.load("kernel"), reference)               # bitwise


def test_sigkill_from_outside_then_resume(tmp_path, reference):
    store = tmp_path / "k.zarr"
    proc = _spawn(store, {"NTKIT_TEST_TILE_SLEEP": "0.03"})
    deadline = time.time() + 60
    try:
        while time.time() < deadline:          # wait until some (not all) tiles are done
            if (store / "zarr.json").exists():
                try:
                    if open_store(str(store)).status().done >= 12:
                        break
                except (ValueError, KeyError, FileNotFoundError):
                    pass                       # store still being created
            if proc.poll() is not None:
                pytest.fail("the kernel process ended before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    _resume_and_check(store, reference)


def test_sigkill_between_tile_data_and_done_flag(tmp_path, reference):
    store = tmp_path / "k.zarr"
    proc = _spawn(store, {"NTKIT_KILL_AT": "7"})
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    h = open_store(str(store))
    assert h.status().done == 6
    # the 7th tile's data reached the disk but it is not flagged: reads show NaN, resume redoes it
    written = [p for p in h.pairs() if not h.is_done(*p)
               and not np.isnan(np.asarray(h._group["kernel"][h.rows(p[0]), h.cols(p[1])])).all()]
    assert len(written) >= 1
    i, j = written[0]
    assert torch.isnan(h["kernel"][h.rows(i), h.cols(j)]).all()
    _resume_and_check(store, reference)


def test_mismatched_resume_is_refused(tmp_path):
    arch = ntkit.layers.serial(ntkit.layers.Dense(1, W_std=1.3), ntkit.layers.Relu(),
                               ntkit.layers.Dense(1))
    x = data(12)
    p = str(tmp_path / "k.zarr")
    ntkit.compute_kernel(arch, x, get="ntk", store=p, tile=5, progress=False)
    other = ntkit.layers.serial(ntkit.layers.Dense(1, W_std=1.5), ntkit.layers.Relu(),
                                ntkit.layers.Dense(1))
    cases = [(dict(arch_or_fn=other), "function"), (dict(x1=x + 1e-9), "x1"),
             (dict(tile=4), "tile"), (dict(get="nngp"), "get"),
             (dict(x2=x[:3]), "x2"), (dict(dtype=torch.float32), "dtype")]
    for change, what in cases:
        kw = dict(arch_or_fn=arch, x1=x, get="ntk", store=p, progress=False)
        kw.update(change)
        with pytest.raises(ValueError) as e:
            ntkit.compute_kernel(kw.pop("arch_or_fn"), kw.pop("x1"), **kw)
        msg = str(e.value)
        assert f"{what}: stored" in msg and "overwrite=True" in msg and "new `store`" in msg
    # same call resumes (nothing to do); overwrite=True replaces the store
    assert ntkit.compute_kernel(arch, x, get="ntk", store=p, progress=False).status().complete
    h = ntkit.compute_kernel(other, x, get="ntk", store=p, progress=False, overwrite=True)
    torch.testing.assert_close(h.load("ntk"), other.kernel(x, get="ntk"), rtol=1e-12, atol=0)
