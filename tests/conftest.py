"""Fixtures shared by the test files (pytest finds them by name; no import needed).

* ``randn64``: ``randn64(*shape, seed=0)`` -> a float64 standard normal tensor from its own
  generator (reproducible, independent of the global RNG): ``tests._helpers.randn64``, which
  test modules import directly (with ``randn64_pair`` for ``(x1, x2)`` batches).
* ``small_fc_arch``: a small fully-connected ReLU architecture with biases (fast exact kernels).
* ``one_thread``: run the test with one torch thread (restored afterwards), for timings and
  bitwise-determinism checks on a shared machine.
* ``one_error_line``: ``one_error_line(command)`` -> the one non-blank stderr line written
  since the last read, checked to be ``ntkit COMMAND: error: ...`` with no traceback (how every
  user error of the ``ntkit`` command must end).
"""
from __future__ import annotations

import pytest
import torch

from tests._helpers import randn64 as _randn64


@pytest.fixture
def randn64():
    return _randn64


@pytest.fixture
def small_fc_arch():
    from ntkit import layers as nl
    return nl.serial(nl.Dense(16, W_std=1.4, b_std=0.1), nl.Relu(),
                     nl.Dense(1, W_std=1.4, b_std=0.1))


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_error_line(capsys):
    def read(command: str) -> str:
        cap = capsys.readouterr()
        err = [ln for ln in cap.err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"ntkit {command}: error:"), err
        assert "Traceback" not in cap.err, cap.err
        return err[0]
    return read
