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
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_map

from ._empirical_common import (IMPLEMENTATIONS, OUTPUTS, ParamFilter, as_batch, cast_input,
                                check_independent, check_model, empty_kernel, jacobian_kernel,
                                jvp_any, make_setup, ntk_vp_kernel, parse_budget, select_params)

__all__ = ["empirical_ntk", "empirical_nngp", "linearize", "taylor_expand", "centered", "scaled",
           "Linearized", "TaylorExpanded", "Centered", "Scaled"]

# relative flop efficiency of the paths (GEMMs run near peak; vmap'd per-example autograd and
# forward-mode jvps do not). Measured on a 2-core CPU with the benchmark MLP; only their order
# matters for ``implementation='auto'``.
_EFFICIENCY = {"jacobian": 0.25, "ntk_vp": 0.2, "structured": 1.0}


def _prepare(model, x1, x2, params, dtype):
    model = check_model(model)
    check_independent(model)
    x1 = as_batch(x1, "x1")
    x2 = None if x2 is None else as_batch(x2, "x2")
    names = select_params(model, params)
    setup = make_setup(model, names, dtype)
    x1 = cast_input(x1, setup.dtype)
    if x2 is not None:
        x2 = cast_input(x2, setup.dtype)
        if x2.device != x1.device:
            raise ValueError(f"`x1` is on {x1.device} but `x2` on {x2.device}; move them together")
    with torch.no_grad():
        out1 = setup.call(x1[:1])
        if out1.ndim == 0 or out1.shape[0] != 1:
            raise ValueError(f"`model` must return (batch, ...) outputs; for a batch of 1 it "
                             f"returned shape {tuple(out1.shape)}")
        setup.out_shape = tuple(out1.shape[1:])
        setup.k = max(1, out1[0].numel())
        if x2 is not None:
            out2 = setup.call(x2[:1])
            if tuple(out2.shape[1:]) != setup.out_shape:
                raise ValueError(f"`model` gives outputs {setup.out_shape} on `x1` but "
                                 f"{tuple(out2.shape[1:])} on `x2`; both must match")
    return setup, x1, x2


def _costs(setup, plan, n1: int, n2: int, sym: bool, output: str) -> Dict[str, float]:
    """Estimated seconds-proportional cost (flops / efficiency) of each implementation.

    F = forward flops per example (Linear/Conv GEMMs from the probe + 2 per other parameter),
    k outputs, P parameters, kp = k^2 ('full') or k, nf = examples whose features are computed.
    jacobian:   3 F k nf (vmap'd reverse passes) + 2 n1 n2 kp P (contraction GEMM)
    ntk_vp:     3 F k n2 (rows of J(x2)) + 3 F k n1 n2 (one jvp over x1 per column)
    structured: (F + k B) nf (forward + k backward passes, B = their input-gradient GEMMs)
                + per layer min(explicit, Gram)
                + the jacobian cost of the parameters it cannot handle.
    """
    k, P = setup.k, setup.numel()
    F = plan.fwd_flops
    nf = n1 + (0 if sym else n2)
    kp = k * k if output == "full" else k
    jac = 3.0 * F * k * nf + 2.0 * n1 * n2 * kp * P
    vp = 3.0 * F * k * n2 + 3.0 * F * k * n1 * n2
    costs = {"jacobian": jac / _EFFICIENCY["jacobian"], "ntk_vp": vp / _EFFICIENCY["ntk_vp"]}
    if plan.layers:
        s = plan.cost(n1, n2, sym, k, output) / _EFFICIENCY["structured"]
        if plan.leftover:
            p_left = setup.numel(plan.leftover)
            s += (3.0 * F * k * nf + 2.0 * n1 * n2 * kp * p_left) / _EFFICIENCY["jacobian"]
        costs["structured"] = s
    return costs


def _choose_implementation(setup, plan, n1, n2, sym, output) -> str:
    costs = _costs(setup, plan, n1, n2, sym, output)
    return min(costs, key=costs.get)


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                  output: str = "trace", implementation: str = "auto",
                  params: ParamFilter = None, memory_budget: Union[int, float, str, None] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Empirical NTK ``J(x1) J(x2)^T`` of ``model`` at its current parameters.

    Args:
      model: any ``nn.Module`` mapping a batch ``(n, ...)`` to outputs ``(n, *out)``. Examples must
        not interact: call ``model.eval()`` if it has BatchNorm or Dropout (eval-mode BatchNorm and
        other buffers are used as they are).
      x1, x2: batches (batch first); ``x2=None`` means ``x2 = x1`` (symmetry is exploited).
      output: ``'trace'`` -> (n1, n2), mean over outputs of ``Theta[a, a]`` (neural-tangents'
        convention); ``'diagonal'`` -> (n1, n2, k); ``'full'`` -> (n1, n2, k, k).
      implementation: ``'jacobian'`` (per-example Jacobians by ``vmap(jacrev)``, contracted),
        ``'ntk_vp'`` (jvps of J(x1) against rows of J(x2); least memory), ``'structured'`` (Linear
        and Conv1d/2d layers from activations and backpropagated output gradients without
        per-example autograd; other parameters fall back to ``'jacobian'``), or ``'auto'``: the
        cheapest by the flop cost model documented in ``_costs`` (probed layer sizes).
      params: which parameters to differentiate: ``None`` (all with ``requires_grad``), a
        callable ``name -> bool``, or names/prefixes (``['fc2', 'head.bias']``).
      memory_budget: bytes (or ``'512MB'``) for intermediates (default 1 GiB): Jacobian blocks
        over rows of x1/x2 and over parameter tensors are sized to fit it. The result itself is
        not counted, and a single parameter tensor for one example is the smallest block.
      dtype: compute dtype (e.g. ``torch.float64``); default the model's parameter dtype.
        Parameters, floating buffers and floating inputs are cast; the model is not modified.

    Returns:
      Tensor (n1, n2), (n1, n2, k) or (n1, n2, k, k), on x1's device.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(),
        ...                           torch.nn.Linear(64, 2))
        >>> x = torch.randn(5, 3)
        >>> empirical_ntk(net, x, output='full', dtype=torch.float64).shape
        torch.Size([5, 5, 2, 2])
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    budget = parse_budget(memory_budget)
    setup, x1, x2 = _prepare(model, x1, x2, params, dtype)
    from ._empirical_structured import Plan, make_plan, structured_kernel

    try:
        plan = make_plan(setup, x1)
    except Exception:
        if implementation == "structured":
            raise
        # the probe (hooks + TorchFunctionMode) failed on this model: autograd paths only
        plan = Plan([], list(setup.names), 2.0 * setup.numel(), 0)
    setup.extra["act_numel"] = plan.act_numel
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    sym = x2 is None
    impl = implementation
    if impl == "auto":
        impl = _choose_implementation(setup, plan, n1, n2, sym, output)
    out = empty_kernel(n1, n2, setup.k, output, setup.dtype, x1.device)
    if impl == "jacobian":
        jacobian_kernel(setup, setup.names, x1, x2, output, budget, out)
    elif impl == "ntk_vp":
        ntk_vp_kernel(setup, setup.names, x1, x2, output, budget, out)
    else:
        structured_kernel(setup, plan, x1, x2, output, budget, out)
        if plan.leftover:
            jacobian_kernel(setup, plan.leftover, x1, x2, output, budget, out)
    return out


def _is_readout(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "AffineModule"


def empirical_nngp(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                   readout: Union[None, str, nn.Module] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Empirical NNGP kernel from the readout-layer features: ``phi(x1) phi(x2)^T / width``.

    ``phi`` is the input of the readout layer (by default the last ``nn.Linear`` or ntkit
    ``Dense`` module called in the forward pass; or the module / module name given as
    ``readout``), flattened per example, and
    ``width`` its number of entries. For an NTK-parameterized readout ``W_std/sqrt(width) W phi +
    b_std b`` with ``W, b ~ N(0, 1)``, the output NNGP is ``W_std**2 * K + b_std**2``, and ``K``
    converges to the infinite-width kernel of the layers below the readout.

    Returns (n1, n2). Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 256), torch.nn.ReLU(),
        ...                           torch.nn.Linear(256, 1))
        >>> empirical_nngp(net, torch.randn(4, 3)).shape
        torch.Size([4, 4])
    """
    model = check_model(model)
    check_independent(model)
    x1 = as_batch(x1, "x1")
    x2 = None if x2 is None else as_batch(x2, "x2")
    if readout is None:
        mods = [m for m in model.modules() if _is_readout(m)]
        if not mods:
            raise ValueError("`model` has no nn.Linear (or ntkit Dense) readout; pass "
                             "`readout=` (a module or its name) whose input are the features")
    else:
        if isinstance(readout, str):
            named = dict(model.named_modules())
            if readout not in named:
                raise ValueError(f"`readout` {readout!r} is not a submodule name of `model`; "
                                 f"some names: {list(named)[:10]}")
            readout = named[readout]
        if not isinstance(readout, nn.Module):
            raise TypeError("`readout` must be None, a submodule or its name")
        mods = [readout]
    setup = make_setup(model, [n for n, _ in model.named_parameters()], dtype)
    captured: List[tuple] = []
    handles = [m.register_forward_hook(
        lambda mod, inp, out: captured.append((id(mod), inp[0].detach()))) for m in mods]

    def feats(x):
        captured.clear()
        with torch.no_grad():
            setup.call(cast_input(x, setup.dtype))
        if not captured:
            raise ValueError("the readout module was not called in the forward pass; pass "
                             "`readout=` explicitly")
        phi = captured[-1][1]
        if phi.shape[0] != x.shape[0]:
            raise ValueError(f"readout input has shape {tuple(phi.shape)}, not batch-first for "
                             f"{x.shape[0]} examples; pass another `readout=`")
        return phi.reshape(x.shape[0], -1)

    try:
        p1 = feats(x1)
        p2 = p1 if x2 is None else feats(x2)
    finally:
        for h in handles:
            h.remove()
    return p1 @ p2.T / p1.shape[1]


# ------------------------------------------------------------------------ linearization & Taylor
def _attr(module: nn.Module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class TaylorExpanded(nn.Module):
    """``sum_{m<=degree} D^m f(theta0)[theta - theta0]^m / m!`` with trainable ``theta``.

    ``self.model`` is a private copy of the model whose selected parameters are ``theta`` (start:
    ``theta0``, stored as buffers). Derivatives are nested ``torch.func.jvp`` (cost ~2^degree
    forward passes); no Jacobian is stored. Parameters not selected stay frozen at ``theta0``.
    """

    def __init__(self, model: nn.Module, degree: int, params: ParamFilter = None):
        super().__init__()
        check_model(model)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"`degree` must be an integer >= 0, got {degree!r}")
        names = select_params(model, params)
        self.degree = degree
        self.model = copy.deepcopy(model)
        self._names = names
        sel = set(names)
        for n, p in self.model.named_parameters():
            if n in sel:
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
        for i, n in enumerate(names):
            self.register_buffer(f"theta0_{i}", _attr(self.model, n).detach().clone())

    def theta0(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, f"theta0_{i}") for i, n in enumerate(self._names)}

    def forward(self, *args, **kwargs):
        theta0 = self.theta0()
        # by attribute path: under an outer functional_call these are plain tensors
        delta = {n: _attr(self.model, n) - theta0[n] for n in self._names}

        def f(p):
            return functional_call(self.model, p, args, kwargs)

        if self.degree == 0:
            with torch.no_grad():
                return f(theta0)
        if self.degree == 1:
            out, dout = jvp_any(f, theta0, delta)
            return tree_map(lambda a, b: a + b, out, dout) if not isinstance(out, torch.Tensor) \
                else out + dout

        def terms(p, m):
            if m == 0:
                return (f(p),)
            prim, tang = jvp(lambda q: terms(q, m - 1), (p,), (delta,))
            return tuple(prim) + (tang[-1],)

        ts = terms(theta0, self.degree)
        total = ts[0]
        for m in range(1, self.degree + 1):
            c = 1.0 / math.factorial(m)
            if isinstance(total, torch.Tensor):
                total = total + c * ts[m]
            else:
                total = tree_map(lambda a, b: a + c * b, total, ts[m])  # noqa: B023 (run now)
        return total

    def extra_repr(self) -> str:
        return f"degree={self.degree}, params={len(self._names)} tensors"


class Linearized(TaylorExpanded):
    """``f(theta0) + J(theta0) (theta - theta0)`` via one ``torch.func.jvp`` per forward."""

    def __init__(self, model: nn.Module, params: ParamFilter = None):
        super().__init__(model, 1, params)


def linearize(model: nn.Module, params: ParamFilter = None) -> Linearized:
    """First-order Taylor model ``f_lin(x; theta) = f(x; theta0) + J(x; theta0)(theta - theta0)``.

    Returns a module holding a copy of ``model`` whose (selected) parameters ``theta`` are
    trainable and start at ``theta0``; each forward costs one jvp (about 2-3 forward passes) and
    stores no Jacobian. Training it with gradient descent follows the empirical-NTK dynamics
    exactly. Example::

        >>> lin = linearize(net)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)   # trains theta, f stays linear in it
    """
    return Linearized(model, params)


def taylor_expand(model: nn.Module, degree: int, params: ParamFilter = None) -> TaylorExpanded:
    """Degree-``degree`` Taylor expansion of ``model`` in its parameters around their current
    values (``degree=1`` is :func:`linearize`; ``0`` is the frozen function at init)."""
    return TaylorExpanded(model, degree, params)


# ------------------------------------------------------------------------ lazy-training scales
class Centered(nn.Module):
    """``f(x; theta) - f(x; theta0)``: zero output at init, same NTK (``theta0`` is frozen)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = check_model(model)
        self._init_names = []
        for i, (n, t) in enumerate(list(model.named_parameters()) + list(model.named_buffers())):
            self._init_names.append(n)
            self.register_buffer(f"init_{i}", t.detach().clone())

    def forward(self, *args, **kwargs):
        init = {n: getattr(self, f"init_{i}") for i, n in enumerate(self._init_names)}
        with torch.no_grad():
            f0 = functional_call(self.model, init, args, kwargs)
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out - f0
        return tree_map(lambda a, b: a - b, out, f0)


class Scaled(nn.Module):
    """``alpha * f(x)`` (Chizat & Bach's lazy-training scale)."""

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__()
        self.model = check_model(model)
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            raise TypeError(f"`alpha` must be a real number, got {alpha!r}") from None
        if not math.isfinite(a) or a == 0:
            raise ValueError(f"`alpha` must be finite and non-zero, got {alpha!r}")
        self.alpha = a

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.alpha * out
        return tree_map(lambda t: self.alpha * t, out)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def centered(model: nn.Module) -> Centered:
    """Wrap ``model`` as ``f - f_init`` (a frozen copy of the initial parameters and buffers is
    kept; ``model`` itself stays trainable and shared). Output is exactly 0 at init, the NTK is
    unchanged. Use with :func:`scaled` for lazy training: ``scaled(centered(net), alpha)``."""
    return Centered(model)


def scaled(model: nn.Module, alpha: float) -> Scaled:
    """Wrap ``model`` as ``alpha * f``. Its NTK is ``alpha**2`` times ``model``'s. Training
    ``scaled(centered(net), alpha)`` with the loss divided by ``alpha**2`` (same learning rate)
    keeps the problem comparable across ``alpha``: the function moves at an ``alpha``-independent
    speed while parameters move ``O(1/alpha)``, so large ``alpha`` approaches the linearized
    (lazy) dynamics. Example::

        >>> lazy = scaled(centered(net), alpha=100.0)
        >>> loss = ((lazy(x) - y) ** 2).mean() / 100.0 ** 2
    """
    return Scaled(model, alpha)
