"""Allocator thresholds set at ``import ntkit`` (``ntkit._malloc``): a freed 50 MB array is
reused from the heap, not mapped afresh; the user's own settings and ``NTKIT_MALLOC=0`` win."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, ctypes
import ntkit
import numpy as np
a = np.ones(50 << 20, dtype=np.uint8)        # 50 MB: above glibc's largest dynamic threshold
addr = a.ctypes.data
heap = []
for line in open('/proc/self/maps'):
    if line.rstrip().endswith('[heap]'):
        lo, hi = (int(v, 16) for v in line.split()[0].split('-'))
        heap.append((lo, hi))
print(json.dumps(dict(status=ntkit._malloc.status(),
                      in_heap=any(lo <= addr < hi for lo, hi in heap))))
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k not in ("NTKIT_MALLOC", "GLIBC_TUNABLES")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_thresholds_raised_at_import_unless_the_user_chose():
    from ntkit._malloc import _glibc
    if _glibc() is None:
        pytest.skip("not glibc")
    on = _probe()
    assert on["status"]["set_by_ntkit"] and on["in_heap"], on
    off = _probe(NTKIT_MALLOC="0")
    assert not off["status"]["set_by_ntkit"] and not off["in_heap"], off
    assert off["status"]["detail"] == "NTKIT_MALLOC=0"
    user = _probe(MALLOC_TRIM_THRESHOLD_="65536")
    assert not user["status"]["set_by_ntkit"]
    assert "MALLOC_TRIM_THRESHOLD_" in user["status"]["detail"]
    tun = _probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert not tun["status"]["set_by_ntkit"] and not tun["in_heap"]
