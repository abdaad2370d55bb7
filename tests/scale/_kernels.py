"""Module-level kernel functions for the scale tests (picklable; importable by subprocesses).

``slow_rbf`` sleeps ``NTKIT_TEST_TILE_SLEEP`` seconds per tile so a test can kill a computation
midway; ``CALLS`` counts the tiles computed in this process."""
import os
import time

import numpy as np
import torch

CALLS = []


def slow_rbf(xa, xb):
    CALLS.append((xa.shape[0], xb.shape[0]))
    time.sleep(float(os.environ.get("NTKIT_TEST_TILE_SLEEP", "0")))
    d2 = (xa * xa).sum(1)[:, None] + (xb * xb).sum(1)[None, :] - 2 * xa @ xb.T
    return torch.exp(-0.5 * d2.clamp_min(0)) + 0.1 * (xa @ xb.T)


def two_kernels(xa, xb):
    g = xa @ xb.T
    return {"lin": g, "cube": g ** 3}


def data(n=40, d=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))
