"""``ntkit demo``: exact NNGP/NTK kernel regression on the bundled digits, then an HTML report.

The demo's flags and steps are defined with the demo itself (:mod:`ntkit._demo`, which also
builds the report for Python callers); this module is its entry in the command table.

Example::

    ntkit demo --quick --out report.html
"""
from __future__ import annotations

from .._demo import register, run

__all__ = ["register", "run"]
