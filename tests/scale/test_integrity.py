"""Fault injection on kernel stores: damaged, missing or truncated chunks, a lost ledger, a
SIGKILL in every phase of writing, two writers. Each case ends in a store bitwise equal to an
untouched run (rerunning the computation recomputes exactly the damaged tiles) or in a clear
error -- never in silently wrong numbers."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import ntkit
from ntkit.scale import (StoreBusyError, StoreDamagedError, open_store, solve, verify_store)
from ntkit.scale._store import LOCK
from tests.scale import _kernels
from tests.scale._kernels import data, slow_rbf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, TILE = 20, 4                     # 5 x 5 tiles, 15 in the upper triangle


def _compute(path, **kw):
    return ntkit.compute_kernel(slow_rbf, data(N), store=str(path), tile=TILE, progress=False,
                                **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    p = tmp_path_factory.mktemp("ref") / "ref.zarr"
    k = _compute(p).load("kernel")
    x = torch.from_numpy(data(N))
    np.testing.assert_allclose(k.numpy(), slow_rbf(x, x).numpy(), rtol=1e-12, atol=1e-12)
    return k


def _rerun_recomputes(path, reference, expect_tiles, warn=True):
    _kernels.CALLS.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = _compute(path)
    assert len(_kernels.CALLS) == expect_tiles
    if warn:
        assert any("damaged" in str(m.message) for m in w), [str(m.message) for m in w]
    assert torch.equal(h.load("kernel"), reference)              # bitwise
    assert verify_store(str(path)).complete
    return h


def _damage(path, kind):
    chunk = os.path.join(path, "kernel", "c", "1", "3")
    if kind == "flip":
        with open(chunk, "r+b") as f:
            f.seek(37)
            b = f.read(1)
            f.seek(37)
            f.write(bytes([b[0] ^ 0x10]))
    elif kind == "delete":
        os.remove(chunk)
    elif kind == "truncate":
        with open(chunk, "r+b") as f:
            f.truncate(50)
    elif kind == "garbage":
        with open(chunk, "wb") as f:
            f.write(np.full(TILE * TILE, 1.7e308).tobytes())
    elif kind == "sums":
        with open(os.path.join(path, "sums", "c", "1", "3", "0"), "r+b") as f:
            f.write(b"\x00\x01\x02\x03")


@pytest.mark.parametrize("kind", ["flip", "delete", "truncate", "garbage", "sums"])
def test_damaged_tile_detected_on_read_and_repaired_by_rerun(tmp_path, reference, kind):
    p = tmp_path / "k.zarr"
    _compute(p)
    _damage(str(p), kind)
    h = open_store(str(p))
    assert h.status().complete                   # the ledger says done ...
    for read in (lambda: h.load("kernel"), lambda: h["kernel"][4:8, 12:16],
                 lambda: h["kernel"][12:16, 4:8], lambda: h["kernel"].matmul(np.ones(N)),
                 lambda: solve(h, np.ones(N), method="cg", diag_reg=1e-3, progress=False)):
        with pytest.raises(StoreDamagedError, match=r"tile \(1, 3\).*rerun the same"):
            read()                               # ... but the data is checked on every read
    assert torch.equal(h["kernel"][0:4, 0:12], reference[0:4, 0:12])   # intact tiles read
    rep = verify_store(str(p))
    assert not rep.ok and [(i, j, k) for i, j, k, _ in rep.damaged] == [(1, 3, "kernel")]
    assert "damaged tile (1, 3)" in str(rep)
    _rerun_recomputes(p, reference, expect_tiles=1)


def test_lost_ledger_arrays_clear_error_then_repair(tmp_path, reference):
    p = tmp_path / "k.zarr"
    _compute(p)
    shutil.rmtree(p / "done")
    with pytest.raises(StoreDamagedError, match="'done' is missing"):
        open_store(str(p)).load("kernel")        # not KeyError: 'done'
    with pytest.raises(StoreDamagedError, match="'done' is missing"):
        open_store(str(p)).status()
    rep = verify_store(str(p))
    assert not rep.ok and "'done' is missing" in rep.problems[0]
    # the ledger is rebuilt from the checksums: no tile needs recomputing
    _rerun_recomputes(p, reference, expect_tiles=0, warn=True)
    # without checksums nothing can be trusted: everything is recomputed
    shutil.rmtree(p / "sums")
    _rerun_recomputes(p, reference, expect_tiles=15)
    # a kernel array lost: recreated, and all its tiles fail verification
    shutil.rmtree(p / "kernel")
    _rerun_recomputes(p, reference, expect_tiles=15)


def test_done_flag_lost_means_recompute_not_damage(tmp_path, reference):
    p = tmp_path / "k.zarr"
    _compute(p)
    os.remove(p / "done" / "c" / "2" / "4")
    h = open_store(str(p))
    assert h.status().done == 14 and verify_store(str(p)).ok
    _rerun_recomputes(p, reference, expect_tiles=1, warn=False)


def test_non_finite_tile_is_an_error(tmp_path):
    def bad(a, b):
        k = a @ b.T
        k[0, -1] = float("inf")
        return k
    with pytest.raises(ValueError, match="NaN/Inf"):
        ntkit.compute_kernel(bad, data(9, 2), store=str(tmp_path / "b.zarr"), tile=3,
                             progress=False)


# ---- two writers ----------------------------------------------------------------------------
def test_second_writer_is_refused_while_first_runs(tmp_path, reference, monkeypatch):
    p = tmp_path / "k.zarr"
    monkeypatch.setenv("NTKIT_TEST_TILE_SLEEP", "0.05")
    errors = []

    def first():
        try:
            _compute(p)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    t = threading.Thread(target=first)
    t.start()
    try:
        deadline = time.time() + 30
        while not (p / LOCK).exists() and time.time() < deadline:
            time.sleep(0.005)
        assert (p / LOCK).exists()
        for ow in (False, True):
            with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}.*{LOCK}"):
                _compute(p, overwrite=ow)
    finally:
        t.join(60)
    assert not errors and not (p / LOCK).exists()
    monkeypatch.setenv("NTKIT_TEST_TILE_SLEEP", "0")
    assert torch.equal(open_store(str(p)).load("kernel"), reference)


def test_foreign_and_stale_locks(tmp_path, reference):
    p = tmp_path / "k.zarr"
    _compute(p)
    lock = p / LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "other-host.example", "token": "t",
                                "since": "then"}))
    with pytest.raises(StoreBusyError, match="other-host.example"):
        _compute(p)
    assert lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "t",
                                "since": "then"}))
    assert _compute(p).status().complete          # stale (dead pid, this host): taken over
    assert not lock.exists()


# ---- a crash in every phase ------------------------------------------------------------------
class _Crash(BaseException):
    """Stands for the process dying at that point (raised past every handler)."""


def _crash_at(monkeypatch, owner, name, at, before):
    orig = getattr(owner, name)
    count = [0]

    def hooked(*a, **k):
        count[0] += 1
        if before and count[0] == at:
            raise _Crash(name)
        out = orig(*a, **k)
        if not before and count[0] == at:
            raise _Crash(name)
        return out
    monkeypatch.setattr(owner, name, hooked)


# phase: (what to break, at which call, before/after it, tiles done after the crash)
PHASES = {"data": ("_write_sums", 5, True, 4),      # data written, checksums not
          "sums": ("_mark_done", 5, True, 4),       # data + checksums written, flag not
          "done": ("_mark_done", 5, False, 5),      # tile complete, next not started
          "create": ("_write_marker", 1, False, 0),  # marker written, no Zarr group yet
          "remove": ("remove_store_contents", 1, False, 0)}   # overwrite: old entries gone


@pytest.mark.parametrize("phase", list(PHASES))
def test_crash_in_every_phase_then_resume(tmp_path, reference, monkeypatch, phase):
    from ntkit.scale import _compute as compute_mod, _store as store_mod
    from ntkit.scale._store import KernelStore
    name, at, before, done = PHASES[phase]
    p = tmp_path / "k.zarr"
    if phase == "remove":
        _compute(p)
    with monkeypatch.context() as m:
        owner = KernelStore if name.startswith(("_write_sums", "_mark")) else \
            (compute_mod if name == "remove_store_contents" else store_mod)
        _crash_at(m, owner, name, at, before)
        with pytest.raises(_Crash):
            _compute(p, overwrite=phase == "remove")
    assert not (p / LOCK).exists()
    if phase in ("create", "remove"):
        with pytest.raises((ValueError, FileNotFoundError)):
            open_store(str(p))                    # no valid store: never half-read
    else:
        assert open_store(str(p)).status().done == done
        assert verify_store(str(p)).ok            # no tile flagged done is damaged
    _kernels.CALLS.clear()
    h = _compute(p)
    probe = 1 if phase in ("create", "remove") else 0       # a new store probes one entry
    assert len(_kernels.CALLS) == 15 - done + probe
    assert torch.equal(h.load("kernel"), reference)
    assert verify_store(str(p)).complete


def test_sigkill_while_overwriting_then_resume(tmp_path, reference):
    """A real SIGKILL after an overwrite deleted the old store's entries: the lock of the dead
    process is taken over and the rerun builds a correct store."""
    p = tmp_path / "k.zarr"
    _compute(p)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NTKIT_KILL_AT="1", NTKIT_KILL_PHASE="remove")
    proc = subprocess.run([sys.executable, "-m", "tests.scale._kill_script", str(p), str(N),
                           str(TILE), "overwrite"], cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (p / LOCK).exists() and not (p / "zarr.json").exists()
    _kernels.CALLS.clear()
    h = _compute(p)
    assert len(_kernels.CALLS) == 16 and torch.equal(h.load("kernel"), reference)
    assert verify_store(str(p)).complete and not (p / LOCK).exists()


def test_writer_that_finished_first_is_resumed_not_replaced(tmp_path, reference, monkeypatch):
    """Two writers start a new store; the first finishes before the second takes the lock: the
    second must resume the finished store (checking its fingerprint), not delete it."""
    from ntkit.scale._store import StoreLock
    p = tmp_path / "k.zarr"
    orig = StoreLock.acquire
    first = {}

    def racing(self):
        if not first:
            monkeypatch.setattr(StoreLock, "acquire", orig)
            first["h"] = _compute(p)             # the other writer, start to finish
            monkeypatch.setattr(StoreLock, "acquire", racing)
        return orig(self)
    monkeypatch.setattr(StoreLock, "acquire", racing)
    _kernels.CALLS.clear()
    h = _compute(p)
    assert len(_kernels.CALLS) == 15 + 1                     # the first writer's tiles + probe
    assert h.store_id == first["h"].store_id                 # same store, resumed
    assert torch.equal(h.load("kernel"), reference)
