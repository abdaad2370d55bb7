"""Fixtures shared by the test files (pytest finds them by name; no import needed).

* ``randn64``: ``randn64(*shape, seed=0)`` -> a float64 standard normal tensor from its own
  generator (reproducible, independent of the global RNG); the ``_x`` helper many files define.
* ``small_fc_arch``: a small fully-connected ReLU architecture with biases (fast exact kernels).
* ``one_thread``: run the test with one torch thread (restored afterwards), for timings and
  bitwise-determinism checks on a shared machine.
"""
from __future__ import annotations

import pytest
import torch


def _randn64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


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
