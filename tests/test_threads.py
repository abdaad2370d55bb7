"""ntkit._threads: OMP_WAIT_POLICY=PASSIVE is set only when it can take effect and the user chose
nothing (libgomp reads it once, when torch loads it). Each case runs in a fresh interpreter."""
import os
import subprocess
import sys

import pytest

CODE = ("import os, sys\n"
        "{pre}\n"
        "from ntkit import _threads\n"
        "print(_threads.configure(), os.environ.get('OMP_WAIT_POLICY'), "
        "_threads.status()['set_by_ntkit'])\n")


def _run(pre="", **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "NTKIT_OMP_PASSIVE")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CODE.format(pre=pre)], env=e,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_sets_passive_before_openmp_is_loaded():
    assert _run() == ["True", "PASSIVE", "True"]


def test_respects_the_users_choice_and_the_opt_out():
    assert _run(OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE", "False"]
    assert _run(NTKIT_OMP_PASSIVE="0") == ["False", "None", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_does_nothing_once_torch_has_loaded_openmp():
    assert _run(pre="import torch") == ["False", "None", "False"]


def test_status_reads_cores_from_the_one_system_module(monkeypatch):
    """Cores are read in one place (ntkit._system), which _threads.status reports."""
    from ntkit import _system, _threads
    monkeypatch.setattr(_system, "available_cores", lambda: 7)
    assert _threads.status()["cores"] == 7
