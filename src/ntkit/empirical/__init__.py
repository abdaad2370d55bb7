"""Empirical NTK/NNGP of any PyTorch model, linearization, Taylor expansion, lazy-training scales.

The empirical NTK of a finite network ``f(x; theta)`` with ``k`` outputs is
``Theta(x, x')[a, b] = sum_p df_a(x)/dtheta_p * df_b(x')/dtheta_p``. It is the kernel the
network's gradient-descent training follows to first order; as the width grows it converges to
the infinite-width NTK of ``arch.kernel``.

Output conventions (those of neural-tangents' ``empirical_ntk_fn``):

* ``output='full'``: ``(n1, n2, k, k)``, every output pair (``trace_axes=()``);
* ``output='diagonal'``: ``(n1, n2, k)``, ``Theta[..., a, a]`` (``diagonal_axes=(-1,)``);
* ``output='trace'`` (default): ``(n1, n2)``, the **mean** over outputs of the diagonal,
  ``(1/k) sum_a Theta[..., a, a]``. neural-tangents divides its traced kernels by the number of
  traced entries (``trace_axes=(-1,)``), and the mean is what converges to the single-output
  infinite-width NTK. Multiply by ``k`` for the sum.

Model outputs of shape ``(batch, *out)`` are flattened to ``k = prod(out)`` outputs.

The package: ``_ntk`` (the kernels and the cost model choosing their implementation),
``_common`` (argument checks, the functional call, Jacobian and NTK-vector-product kernels, the
memory-bounded block scheduler), ``_structured`` (the Linear/Conv contraction without
per-example autograd) and ``_wrappers`` (linearization, Taylor expansion, lazy-training scales).
"""
from ._ntk import empirical_nngp, empirical_ntk
from ._wrappers import (Centered, Linearized, Scaled, TaylorExpanded, centered, linearize,
                        scaled, taylor_expand)

__all__ = ["empirical_ntk", "empirical_nngp", "linearize", "taylor_expand", "centered", "scaled",
           "Linearized", "TaylorExpanded", "Centered", "Scaled"]
