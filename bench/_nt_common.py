"""Plumbing shared by the benchmarks that run neural-tangents (NT) beside ntkit
(``bench_vs_nt.py``, ``bench_layers_vs_nt.py``): where NT's python is, the environment its
subprocess gets, the timing rule both sides use, and what each JSON line records about the
machine and its load.

Runs in ntkit's python (``_nt_layers.py`` is the NT side and imports nothing from here).
Imported by the benchmark scripts as ``import _nt_common`` (their folder is on ``sys.path``
when they run as ``python bench/<script>.py``).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
#: NT 0.6.5's python (``NT_PYTHON`` overrides); the benchmarks' ``--nt-python`` default
DEFAULT_NT_PYTHON = os.environ.get("NT_PYTHON", "/tmp/venv-nt/bin/python")


def nt_subprocess_env() -> Dict[str, str]:
    """The environment for NT's subprocess: ours, minus the ``OMP_WAIT_POLICY=PASSIVE`` that
    ntkit set for itself (:mod:`ntkit._threads`), so NT runs with its own defaults; a policy
    the user chose is passed on. ``--omp-default`` runs (``_threads`` never configured) pass the
    environment unchanged."""
    env = dict(os.environ)
    threads = sys.modules.get("ntkit._threads")
    if threads is not None and threads.status().get("set_by_ntkit"):
        env.pop("OMP_WAIT_POLICY", None)
    return env


def time_call(fn: Callable[[], Any], repeats: int, budget_s: float) -> Tuple[Any, Dict[str, Any]]:
    """NT's harness rule: one untimed warm-up call, then up to ``repeats`` timed calls (stop
    early once their sum passes ``budget_s``). Returns ``(last output, {time_s (median), min_s,
    times_s, warmup_s})``."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    times = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    s = sorted(times) or [float("nan")]   # (repeats=0: the warm-up only)
    return out, dict(time_s=round(s[len(s) // 2], 4), min_s=round(s[0], 4),
                     times_s=[round(t, 4) for t in times], warmup_s=round(warm, 4))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_record(**extra: Any) -> Dict[str, Any]:
    """What every JSON line records about the run: CPU, cores, affinity, torch threads and
    version, ``OMP_WAIT_POLICY``, the git revision, plus ``extra``."""
    import torch
    return dict(cpu_model=cpu_model(), cpus=os.cpu_count(),
                affinity=len(os.sched_getaffinity(0)), threads=torch.get_num_threads(),
                torch=torch.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                git=subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip(),
                **extra)


def load_record(before: Sequence[float], after_ntkit: Sequence[float],
                after_nt: Sequence[float]) -> Dict[str, list]:
    """The 1/5/15-minute load averages (``os.getloadavg()``) before ntkit's side, between the
    two sides and after NT's, rounded, as the JSON line's ``load_*`` fields."""
    return dict(load_before=[round(v, 2) for v in before],
                load_after_ntkit=[round(v, 2) for v in after_ntkit],
                load_after_nt=[round(v, 2) for v in after_nt])
