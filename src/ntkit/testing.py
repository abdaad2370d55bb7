"""Oracles and a shared test base for kernels, shipped with the package (like linear_operator's).

* :func:`bivariate_expectation` — ``E[f(u) g(v)]`` for a bivariate normal by adaptive nested
  quadrature (scipy), with break points at kinks; the oracle for every activation's dual map.
* :func:`mc_error_slope` — fitted log-log slope of the Monte Carlo error against width.
* :class:`KernelTestCase` — subclass, supply ``build()`` (an architecture) and optionally
  ``inputs()`` / ``reference(x1, x2)``; get the standard battery of checks (symmetry, exact
  diagonal, tiling invariance, float32 accuracy, Monte Carlo convergence ~ width^-1/2).

Example::

    class TestMyNet(KernelTestCase):
        def build(self):
            return serial(Dense(64), Relu(), Dense(1))
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from .monte_carlo import monte_carlo_kernel

if TYPE_CHECKING:
    from .kernel import Kernel
    from .layers import Layer

__all__ = ["bivariate_expectation", "mc_error_slope", "KernelTestCase"]


def bivariate_expectation(f: Callable[[float], float], g: Callable[[float], float], v1: float,
                          v2: float, c: float, kinks: Sequence[float] = (0.0,),
                          tol: float = 1e-13, lim: float = 13.0) -> float:
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` by nested ``scipy.quad``.

    ``u = s1 z1``, ``v = s2 (rho z1 + sqrt(1 - rho^2) z2)``; break points where ``u`` or ``v``
    crosses a kink of ``f``/``g`` keep non-smooth integrands accurate (~1e-12).
    """
    from scipy import integrate

    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    rho = max(-1.0, min(1.0, c / (s1 * s2)))
    r = math.sqrt(max(0.0, 1 - rho * rho))
    def phi(z: float) -> float:
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    opts: Any = dict(limit=400, epsabs=tol, epsrel=tol)

    if r < 1e-12:  # degenerate: v = sign(rho) s2 z1
        pts = sorted({k / s1 for k in kinks if abs(k / s1) < lim}
                     | {k / (s2 * rho) for k in kinks if abs(k / (s2 * rho)) < lim})
        return float(integrate.quad(lambda z: f(s1 * z) * g(s2 * rho * z) * phi(z), -lim, lim,
                                    points=pts or None, **opts)[0])

    def inner(z1: float) -> float:
        pts = [(k / s2 - rho * z1) / r for k in kinks]
        pts = [p for p in pts if abs(p) < lim]
        return float(integrate.quad(lambda z2: g(s2 * (rho * z1 + r * z2)) * phi(z2), -lim, lim,
                                    points=pts or None, **opts)[0])

    pts = [k / s1 for k in kinks if abs(k / s1) < lim]
    return float(integrate.quad(lambda z1: f(s1 * z1) * inner(z1) * phi(z1), -lim, lim,
                                points=pts or None, **opts)[0])


def mc_error_slope(arch: Layer, x: torch.Tensor, widths: Sequence[int], get: str = "ntk",
                   n_samples: int = 4, seeds: int = 1) -> Tuple[float, np.ndarray]:
    """Slope of ``log(relative Frobenius error)`` vs ``log(width)`` of Monte Carlo estimates.

    The exact kernel is ``arch.kernel(x, get=get)``; returns ``(slope, errors)``. About -1/2
    for a correct kernel; about 0 when the kernel map is wrong (the error stops shrinking).
    """

    exact = arch.kernel(x, get=get)
    errs: List[float] = []
    for w in widths:
        e = 0.0
        for s in range(seeds):
            est = monte_carlo_kernel(arch, x, width=w, n_samples=n_samples, get=get,
                                     seed=1000 * s + w)
            assert isinstance(est, torch.Tensor)          # one string `get`: one tensor
            e += float(torch.linalg.norm(est - exact) / torch.linalg.norm(exact)) ** 2
        errs.append(math.sqrt(e / seeds))
    errs_a = np.array(errs)
    slope = np.polyfit(np.log(np.asarray(widths, float)), np.log(errs_a), 1)[0]
    return float(slope), errs_a


def _pair(k: Kernel) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(nngp, ntk)`` of a kernel record computed with both keys."""
    assert k.nngp is not None and k.ntk is not None
    return k.nngp, k.ntk


class KernelTestCase:
    """Pytest base class: subclasses override :meth:`build` (and optionally the rest)."""

    widths: Sequence[int] = (16, 64, 256, 1024)
    n_samples: int = 2
    seeds: int = 4
    slope_tol: float = 0.2
    rtol_ref: float = 1e-10

    def build(self) -> Layer:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(5, 3, generator=g, dtype=torch.float64),
                torch.randn(4, 3, generator=g, dtype=torch.float64))

    def reference(self, x1: torch.Tensor, x2: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(nngp, ntk)`` derived independently, or ``None``."""
        return None

    # -- the battery ---------------------------------------------------------------------
    def test_symmetric_matches_explicit(self) -> None:
        arch = self.build()
        x1, _ = self.inputs()
        ks, kx = _pair(arch.kernel(x1)), _pair(arch.kernel(x1, x1))
        for a, b in zip(ks, kx):
            assert torch.allclose(a, a.transpose(0, 1), rtol=0, atol=0)
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)

    def test_cross_blocks_and_tiles(self) -> None:
        arch = self.build()
        x1, x2 = self.inputs()
        full = _pair(arch.kernel(torch.cat([x1, x2])))
        cross = _pair(arch.kernel(x1, x2))
        n = x1.shape[0]
        for c, f in zip(cross, full):
            torch.testing.assert_close(c, f[:n, n:], rtol=1e-12, atol=1e-12)
        tiled = _pair(arch.kernel(torch.cat([x1, x2]), tile=2))
        for t, f in zip(tiled, full):
            torch.testing.assert_close(t, f, rtol=1e-12, atol=1e-12)

    def test_get_single_and_float32(self) -> None:
        arch = self.build()
        x1, _ = self.inputs()
        k64 = _pair(arch.kernel(x1))
        ntk = arch.kernel(x1, get="ntk")
        torch.testing.assert_close(ntk, k64[1], rtol=1e-12, atol=1e-12)
        k32 = _pair(arch.kernel(x1.float(), dtype=torch.float32))
        assert k32[0].dtype == torch.float32
        torch.testing.assert_close(k32[0].double(), k64[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k32[1].double(), k64[1], rtol=1e-4, atol=1e-5)
        # exact diagonal in float32: no cancellation at x1 == x2
        d32 = torch.diagonal(k32[0], dim1=0, dim2=1).double()
        d64 = torch.diagonal(k64[0], dim1=0, dim2=1)
        assert float(((d32 - d64).abs() / d64.abs().clamp_min(1e-30)).max()) < 1e-5

    def test_reference(self) -> None:
        arch = self.build()
        x1, x2 = self.inputs()
        ref = self.reference(x1, x2)
        if ref is None:
            return
        k = arch.kernel(x1, x2)
        torch.testing.assert_close(k.nngp, ref[0], rtol=self.rtol_ref, atol=self.rtol_ref)
        torch.testing.assert_close(k.ntk, ref[1], rtol=self.rtol_ref, atol=self.rtol_ref)

    def test_monte_carlo_converges(self) -> None:
        arch = self.build()
        x = torch.cat(self.inputs())
        for get in ("nngp", "ntk"):
            slope, errs = mc_error_slope(arch, x, self.widths, get=get,
                                         n_samples=self.n_samples, seeds=self.seeds)
            assert abs(slope + 0.5) < self.slope_tol, (get, slope, errs)
            assert errs[-1] < 0.15, (get, errs)
