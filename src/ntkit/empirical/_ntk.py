"""The empirical NTK and NNGP kernels of any ``nn.Module``: argument preparation, the cost model
that picks an implementation, and the two public kernels. Private: the public surface is
:mod:`ntkit.empirical` (output conventions there).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..layers.dense import AffineModule
from ._common import (IMPLEMENTATIONS, OUTPUTS, ParamFilter, as_batch, cast_call_args,
                      cast_input, check_independent, check_model, empty_kernel, jacobian_kernel,
                      make_setup, ntk_vp_kernel, parse_budget, prepare_call_args, select_params)
from ..layers import check_mask_constant, finite_stand_in, masked_input
from ._structured import Plan, make_plan, structured_kernel

__all__ = ["empirical_ntk", "empirical_nngp"]

# relative flop efficiency of the paths (GEMMs run near peak; vmap'd per-example autograd and
# forward-mode jvps do not). Measured on a 2-core CPU with the benchmark MLP; only their order
# matters for ``implementation='auto'``.
_EFFICIENCY = {"jacobian": 0.25, "ntk_vp": 0.2, "structured": 1.0}


def _masked_inputs(model: nn.Module, x1: Any, x2: Any, dtype: Optional[torch.dtype],
                   mask_constant: Any):
    """``(x1, x2, c')`` for ``mask_constant``: the padding found in the inputs' own dtype and
    kept exactly through the cast to the compute dtype (:func:`ntkit.layers.masked_input`);
    non-finite padding (``NaN``, ``inf``) re-marked by a finite stand-in ``c'`` the network
    masks identically (:func:`ntkit.layers.finite_stand_in`), as ``monte_carlo_kernel`` does."""
    c = check_mask_constant(mask_constant)
    declared = getattr(model, "call_args", ())
    if "_ntkit_mask_info" not in model.__dict__ and not (
            isinstance(declared, tuple) and "mask_constant" in declared):
        raise TypeError("`mask_constant` needs a network that masks its inputs: one built by "
                        "arch.module(...) from an ntkit.layers architecture (its forward "
                        "takes mask_constant), or a model declaring 'mask_constant' in its "
                        "`call_args`")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor with the batch as its first "
                            f"dimension, got {type(x).__name__}; convert with torch.as_tensor")
    if dtype is None:
        first = next(iter(model.parameters()), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else \
            torch.get_default_dtype()
    x1 = masked_input(x1, "x1", dtype, c)
    x2 = None if x2 is None else masked_input(x2, "x2", dtype, c)
    (x1, x2), c = finite_stand_in([x1, x2], c)
    return x1, x2, c


def _prepare(model, x1, x2, params, dtype, call_args=None, mask_constant=None):
    model = check_model(model)
    check_independent(model)
    if mask_constant is not None:
        x1, x2, mask_constant = _masked_inputs(model, x1, x2, dtype, mask_constant)
    x1 = as_batch(x1, "x1")
    x2 = None if x2 is None else as_batch(x2, "x2")
    args = prepare_call_args(model, call_args, x1.shape[0],
                             None if x2 is None else x2.shape[0]) if call_args else {}
    names = select_params(model, params)
    setup = make_setup(model, names, dtype)
    x1 = cast_input(x1, setup.dtype)
    setup.call_args = cast_call_args(args, setup.dtype, x1.device)
    if mask_constant is not None:   # one number for every call, never split into x1 / x2 rows
        setup.call_args["mask_constant"] = (mask_constant, mask_constant, False)
    if x2 is not None:
        x2 = cast_input(x2, setup.dtype)
        if x2.device != x1.device:
            raise ValueError(f"`x1` is on {x1.device} but `x2` on {x2.device}; move them together")
    with torch.no_grad():
        out1 = setup.call(x1[:1], kwargs=setup.kwargs(1, slice(0, 1)))
        if out1.ndim == 0 or out1.shape[0] != 1:
            raise ValueError(f"`model` must return (batch, ...) outputs; for a batch of 1 it "
                             f"returned shape {tuple(out1.shape)}")
        setup.out_shape = tuple(out1.shape[1:])
        setup.k = max(1, out1[0].numel())
        if x2 is not None:
            out2 = setup.call(x2[:1], kwargs=setup.kwargs(2, slice(0, 1)))
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
    return min(costs, key=costs.__getitem__)


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                  output: str = "trace", implementation: str = "auto",
                  params: ParamFilter = None, memory_budget: Union[int, float, str, None] = None,
                  dtype: Optional[torch.dtype] = None, mask_constant: Optional[float] = None,
                  **call_args: Any) -> torch.Tensor:
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
      **call_args: keyword arguments of ``model``'s forward, e.g. the graph of the finite
        network of an architecture with :class:`~ntkit.layers.Aggregate`:
        ``empirical_ntk(net, x1, x2, pattern=(p1, p2))`` (``pattern=p`` when ``x2`` is
        ``None``), as in ``arch.kernel``. Arrays are per-example (batch on the leading axis)
        and every call of the model gets the rows of the examples it runs on; other values (a
        number, a string) are passed unchanged. A model with a ``call_args`` attribute (ntkit's
        finite networks) refuses names it does not read (``TypeError``). Every implementation
        takes them; the per-example Jacobians of ``'jacobian'`` (and of the x2 rows of
        ``'ntk_vp'``) are computed one example at a time when ``vmap`` cannot trace the model
        on a batched argument (e.g. ``Aggregate`` checking its pattern): the same numbers,
        slower than the vectorized path.
      mask_constant: neural-tangents' masking for a network built by ``arch.module(...)``
        (variable-length sequences / graphs padded with a constant): every call runs as
        ``model(x, mask_constant=c, ...)``, so positions whose channels all equal ``c`` are
        padding and the kernel converges to ``arch.kernel(x1, x2, mask_constant=c)``. The
        padding is found in the inputs' own dtype (a cast that would change it is refused);
        ``NaN`` / ``inf`` padding is accepted (re-marked by a finite stand-in the network masks
        identically). One number for ``x1`` and ``x2``; combines with call-time arguments
        (``pattern=...``).

    Returns:
      Tensor (n1, n2), (n1, n2, k) or (n1, n2, k, k), on x1's device.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(),
        ...                           torch.nn.Linear(64, 2))
        >>> x = torch.randn(5, 3)
        >>> empirical_ntk(net, x, output='full', dtype=torch.float64).shape
        torch.Size([5, 5, 2, 2])
        >>> # padded sequences (N, C, L), NaN padding, on a finite ntkit network
        >>> # empirical_ntk(arch.module((C, L)), xp, mask_constant=float('nan'))
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    budget = parse_budget(memory_budget)
    setup, x1, x2 = _prepare(model, x1, x2, params, dtype, call_args, mask_constant)

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
    """An ``nn.Linear`` or the module of an ntkit ``Dense`` layer (by type, not by name)."""
    return isinstance(m, (nn.Linear, AffineModule))


def empirical_nngp(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                   readout: Union[None, str, nn.Module] = None,
                   dtype: Optional[torch.dtype] = None, **call_args: Any) -> torch.Tensor:
    """Empirical NNGP kernel from the readout-layer features: ``phi(x1) phi(x2)^T / width``.

    ``phi`` is the input of the readout layer (by default the last ``nn.Linear`` or ntkit
    ``Dense`` module called in the forward pass; or the module / module name given as
    ``readout``), flattened per example, and
    ``width`` its number of entries. For an NTK-parameterized readout ``W_std/sqrt(width) W phi +
    b_std b`` with ``W, b ~ N(0, 1)``, the output NNGP is ``W_std**2 * K + b_std**2``, and ``K``
    converges to the infinite-width kernel of the layers below the readout.

    ``**call_args``: keyword arguments of the model's forward (per-example arrays, e.g. the
    graph ``pattern=(p1, p2)``), as in :func:`empirical_ntk`.

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
    args = prepare_call_args(model, call_args, x1.shape[0],
                             None if x2 is None else x2.shape[0]) if call_args else {}
    setup = make_setup(model, [n for n, _ in model.named_parameters()], dtype)
    setup.call_args = cast_call_args(args, setup.dtype, x1.device)
    captured: List[tuple] = []
    handles = [m.register_forward_hook(
        lambda mod, inp, out: captured.append((id(mod), inp[0].detach()))) for m in mods]

    def feats(x, side):
        captured.clear()
        with torch.no_grad():
            setup.call(cast_input(x, setup.dtype), kwargs=setup.kwargs(side, slice(None)))
        if not captured:
            raise ValueError("the readout module was not called in the forward pass; pass "
                             "`readout=` explicitly")
        phi = captured[-1][1]
        if phi.shape[0] != x.shape[0]:
            raise ValueError(f"readout input has shape {tuple(phi.shape)}, not batch-first for "
                             f"{x.shape[0]} examples; pass another `readout=`")
        return phi.reshape(x.shape[0], -1)

    try:
        p1 = feats(x1, 1)
        p2 = p1 if x2 is None else feats(x2, 2)
    finally:
        for h in handles:
            h.remove()
    return p1 @ p2.T / p1.shape[1]
