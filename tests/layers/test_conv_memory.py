"""Memory-bounded evaluation of convolutional kernels (issue 3, item 4).

* The peak resident memory of a CNN-GAP kernel evaluated under ``memory_budget`` stays under
  the budget. Measured in a fresh subprocess as the peak resident set during the call (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not allowed)
  minus the resident set before it, so torch allocations count (``tracemalloc`` does not see
  them).
* A plan that cannot fit raises ``MemoryError`` naming a budget (or tile) that would fit.
* ``progress=True`` shows a progress bar over tiles; tiling, the self-covariance memo and the
  cache caps do not change the numbers (tiled == one tile, to rounding).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ntkit import layers as nl

MB = 1 << 20


def _cnn(top, depth=2):
    layers = []
    for _ in range(depth):
        layers += [nl.Conv(8, 3, padding="SAME", W_std=1.4, b_std=0.1), nl.Relu()]
    return nl.serial(*layers, top, nl.Dense(1, W_std=1.4, b_std=0.1))


_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from ntkit import layers as nl
    torch.set_num_threads(1)
    n, hw, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    layers = []
    for _ in range(2):
        layers += [nl.Conv(8, 3, padding="SAME", W_std=1.4, b_std=0.1), nl.Relu()]
    arch = nl.serial(*layers, nl.GlobalAvgPool(), nl.Dense(1, W_std=1.4, b_std=0.1))
    x = torch.randn(n, 3, hw, hw, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    arch.kernel(torch.randn(1, 3, 4, 4, dtype=torch.float64))  # warm-up on a tiny input

    def status(field):  # kB -> bytes
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    try:  # reset the peak-RSS mark (VmHWM) so import-time peaks do not hide the kernel's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS")
    k = arch.kernel(x, memory_budget=budget)
    peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(growth=peak - before, before=before, reset=reset,
                          finite=bool(torch.isfinite(k.ntk).all()))))
""")


def test_peak_rss_stays_under_memory_budget():
    """6 images of 32x32: one entry's pixel-pair arrays are 8 MiB (f64), the planned 1 x 1
    tile's working set is ~190 MiB and the untiled kernel would need ~3.5 GiB. Under a 320 MiB
    budget the process grows by less than the budget."""
    budget = 320 * MB
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "6", "32", str(budget)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    assert res["growth"] < budget, (res["growth"] / MB, budget / MB)
    if res["reset"]:  # the measurement sees the kernel: its arrays are 8 MiB each
        assert res["growth"] > 16 * MB, res


def test_plan_that_cannot_fit_says_what_would():
    arch = _cnn(nl.GlobalAvgPool())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(MemoryError, match=r"memory_budget.*a budget of at least [0-9.]+ GiB"):
        arch.kernel(x, memory_budget=50 * MB)
    with pytest.raises(MemoryError, match=r"tile <= 1 fits"):
        arch.kernel(x, memory_budget=300 * MB, tile=3)
    with pytest.raises(MemoryError, match="the requested kernel alone needs"):
        nl.serial(nl.Flatten(), nl.Dense(1)).kernel(torch.randn(3000, 1, 2, 2),
                                                    memory_budget=10 * MB)


@pytest.mark.parametrize("top", ["gap", "flatten"])
def test_tiled_with_memo_matches_one_tile(top, capsys):
    """Small tiles (memo reusing self-covariances across tiles, x2=None upper triangle and x2
    given) agree with a single tile to rounding; progress=True prints a tile bar."""
    arch = _cnn(nl.GlobalAvgPool() if top == "gap" else nl.Flatten())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64, generator=g)
    y = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=g)
    ref = arch.kernel(x, tile=7)
    refxy = arch.kernel(x, y, tile=7)
    for t in (1, 2, 3):
        k = arch.kernel(x, tile=t, progress=(t == 2))
        kxy = arch.kernel(x, y, tile=t)
        for a, b in ((k.nngp, ref.nngp), (k.ntk, ref.ntk), (kxy.nngp, refxy.nngp),
                     (kxy.ntk, refxy.ntk)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert "kernel tiles" in capsys.readouterr().err


def test_float32_agrees_with_float64():
    """float32 pixel-pair kernels keep ~1e-6 relative accuracy, including the batch diagonal
    (exact self-covariance pixel diagonals, no sqrt(v1 v2 - c^2) cancellation)."""
    arch = _cnn(nl.GlobalAvgPool(), depth=3)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    k64 = arch.kernel(x)
    k32 = arch.kernel(x, dtype=torch.float32)
    for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
        rel = ((a.double() - b).abs() / b.abs()).max()
        assert rel < 5e-6, float(rel)
        drel = ((a.double().diagonal() - b.diagonal()).abs() / b.diagonal()).max()
        assert drel < 2e-6, float(drel)
