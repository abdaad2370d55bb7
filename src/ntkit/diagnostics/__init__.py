"""Lazy training, measured: how far a network is from its linearization, for any ``nn.Module``.

Chizat & Bach (2019, "On lazy training in differentiable programming") view a model as a map
``h: w -> h(w)`` from parameters to its outputs on the data, here the vector of the ``N = n * k``
stacked outputs ``h(w) = model(x).reshape(-1)``. Training is *lazy* (the network stays close to
its linearization, the NTK stays put) when the inverse relative scale

    ``kappa(w0) = ||h(w0) - y|| * ||D^2 h(w0)|| / ||D h(w0)||^2``

is small. Norms (all in float64, on a private copy of the model):

* output space: ``||v|| = sqrt(mean(v^2))`` over the ``N`` stacked outputs (the norm of the loss
  ``1/2 ||h - y||^2``; kappa does not depend on this normalization, it cancels);
* parameter space: the Euclidean norm of all trainable parameters, concatenated;
* ``||D h(w0)||`` ("gradient norm"): operator norm of the Jacobian ``J`` (N x P),
  ``sup_{|u|=1} ||J u|| = sqrt(lambda_max(J J^T) / N)``, from the full empirical NTK ``J J^T``;
* ``||D^2 h(w0)||`` ("Hessian norm"): operator norm of the symmetric bilinear map
  ``(u, v) -> D^2 h(w0)[u, v]``, ``sup_{|u|=|v|=1} ||D^2 h[u, v]|| = sup_{|u|=1} ||D^2 h[u, u]||``
  (Banach's theorem for symmetric forms on Hilbert spaces) ``= sup_{||z||=1} |lambda|_max(H_z)``
  with ``H_z = Hessian of <z, h(w)>``. It is estimated by alternating maximization: for fixed
  ``z`` Lanczos on Hessian-vector products of ``<z, h>`` finds the largest-magnitude eigenpair
  ``(lambda, u)``; then ``z <- D^2 h[u, u] / ||D^2 h[u, u]||`` (a forward-over-forward
  derivative). Every iterate is a certified lower bound; it increases monotonically.

Scalings these give (tests check them on trained and untrained networks): a 1-hidden-layer net
with LeCun (standard) initialization has ``||Dh|| ~ sqrt(m)``, ``||D^2 h|| ~ 1``,
``kappa ~ 1/m`` in the width ``m``; in NTK parameterization ``||Dh|| ~ 1``,
``||D^2 h|| ~ m^(-1/2)`` (times a slowly growing max over neurons), ``kappa ~ m^(-1/2)``, and the
relative weight change after training ``~ m^(-1/2)``. Scaling a centered model by ``alpha``
(``alpha * (f - f_0)``, loss divided by ``alpha^2``) gives ``kappa ~ 1/alpha``.

Example::

    >>> from ntkit import diagnostics as dg
    >>> s = dg.lazy_scales(net, x, y)                 # s.kappa, s.jacobian_norm, s.hessian_norm
    >>> rec = dg.train(net, x, y, steps=200)          # rec.rel_weight_change[-1], rec.kernel_drift
    >>> sweep = dg.width_sweep(arch, x, y, widths=(64, 256, 1024), seeds=(0, 1))
    >>> sweep.slope('kappa')                          # Slope(slope=-0.5.., low=.., high=..)
    >>> sweep.to_pandas(); plots.plot_scaling(sweep, path="scaling.png")   # ntkit.plots

The package is split by concern; every public name is importable from ``ntkit.diagnostics``:

* ``_norms``: :func:`jacobian_norm`, :func:`hessian_norm`, :func:`lazy_scales`, :func:`kappa`;
* ``_training``: :func:`train` (the one training loop of ntkit: the sweeps, the demo and the
  figures' experiments all use it), :func:`relative_weight_change`, :func:`kernel_drift`,
  :func:`auto_lr` (the stable learning rate of ``learning_rate='auto'``);
* ``_slopes``: :func:`fit_slope`, :class:`Slope`;
* ``_sweeps``: :func:`width_sweep`, :func:`alpha_sweep`, :class:`LazySweep`,
  :func:`arch_parameterization`;
* ``_common``: input checks, float64 copies, the full empirical NTK.

Figures of these results are drawn by :mod:`ntkit.plots` (which imports this package, never
the reverse).
"""
from __future__ import annotations

from ._norms import LazyScales, hessian_norm, jacobian_norm, kappa, lazy_scales
from ._slopes import Slope, fit_slope
from ._sweeps import LazySweep, alpha_sweep, arch_parameterization, width_sweep
from ._training import TrainingRecord, auto_lr, kernel_drift, relative_weight_change, train

__all__ = [
    "LazyScales", "lazy_scales", "jacobian_norm", "hessian_norm", "kappa",
    "relative_weight_change", "kernel_drift", "TrainingRecord", "train", "auto_lr",
    "Slope", "fit_slope", "LazySweep", "width_sweep", "alpha_sweep", "arch_parameterization",
]
