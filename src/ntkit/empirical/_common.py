"""Shared internals of :mod:`ntkit.empirical`: argument checks, the functional call of a model,
per-example Jacobian features, their contraction into kernel blocks, and a memory-bounded block
scheduler. Private: the public surface is in ``ntkit.empirical``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

# check_model is re-exported for the other modules of the package
from .._validation import check_model, parse_memory_budget  # noqa: F401
from ..layers import check_call_arg_pair

OUTPUTS = ("trace", "full", "diagonal")
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vp", "structured")
DEFAULT_BUDGET = 1 << 30  # 1 GiB of intermediates

ParamFilter = Union[None, str, Callable[[str], bool], Iterable[str]]


# ----------------------------------------------------------------------------------- arguments
def parse_budget(memory_budget: Any) -> int:
    """Bytes from an int/float or a string such as ``'512MB'`` / ``'2GiB'`` (None -> 1 GiB);
    the one convention of :func:`ntkit._validation.parse_memory_budget`."""
    budget = parse_memory_budget(memory_budget)
    return DEFAULT_BUDGET if budget is None else budget


def check_independent(model: nn.Module) -> None:
    """Per-example kernels need examples that do not interact: no batch statistics, no dropout."""
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"module {mname or type(m).__name__!r} is a BatchNorm in training mode: its output "
                "depends on the whole batch, so a per-example NTK is undefined. Call model.eval() "
                "first (eval-mode BatchNorm uses the running statistics, which is supported)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"module {mname or type(m).__name__!r} is Dropout in training mode, which makes "
                "the NTK random. Call model.eval() first")


def select_params(model: nn.Module, params: ParamFilter) -> List[str]:
    """Names of the parameters the kernel differentiates, in ``named_parameters`` order.

    ``None``: every parameter with ``requires_grad=True``; a callable ``name -> bool``; or a name /
    an iterable of names or prefixes (``'fc'`` selects ``'fc.weight'`` and ``'fc.bias'``).
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("`model` has no parameters, so its NTK is zero; register the weights as "
                         "nn.Parameter")
    names = [n for n, _ in named]
    if params is None:
        sel = [n for n, p in named if p.requires_grad]
        if not sel:
            raise ValueError("every parameter of `model` has requires_grad=False; pass `params=` "
                             "to choose which ones the kernel differentiates")
        return sel
    if callable(params) and not isinstance(params, str):
        sel = [n for n in names if bool(params(n))]
        if not sel:
            raise ValueError(f"`params` filter selected no parameter; available names: "
                             f"{names[:12]}{' ...' if len(names) > 12 else ''}")
        return sel
    items = [params] if isinstance(params, str) else list(params)
    if not all(isinstance(s, str) for s in items):
        raise TypeError("`params` must be None, a callable name -> bool, or names/prefixes (str)")
    chosen = set()
    for s in items:
        hit = [n for n in names if n == s or n.startswith(s + ".") or s == ""]
        if not hit:
            raise ValueError(f"`params` entry {s!r} matches no parameter name or prefix; available "
                             f"names: {names[:12]}{' ...' if len(names) > 12 else ''}")
        chosen.update(hit)
    return [n for n in names if n in chosen]


def as_batch(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor with the batch as its first dimension, "
                        f"got {type(x).__name__}; convert with torch.as_tensor")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must have a non-empty leading batch dimension, got shape "
                         f"{tuple(x.shape)}; for a single example use `{name}[None]`")
    # one reduction pass; the sum of finite float32/64 inputs is finite unless near overflow
    if x.is_floating_point() and not (torch.isfinite(x.sum()) or torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN/Inf values; clean them first")
    return x.detach()


# ---------------------------------------------------------------------------- call-time arguments
# name -> (value for x1, value for x2 or None when x2 is x1, per-example?)
CallArgs = Dict[str, Tuple[Any, Any, bool]]


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def prepare_call_args(model: nn.Module, kwargs: Dict[str, Any], n1: int,
                      n2: Optional[int]) -> CallArgs:
    """Validate the call-time keyword arguments of ``model`` for a kernel between ``x1`` (``n1``
    examples) and ``x2`` (``n2``, ``None`` when ``x2`` is ``x1``).

    Arrays (tensors, numpy arrays) are per-example, batch on the leading axis, and are sliced
    with the rows of ``x1`` / ``x2``: one array when ``x2`` is ``None`` (or the pair ``(a, None)``
    / ``(a, a)``), the pair ``(a1, a2)`` otherwise. Any other value (a number, a string, ``None``)
    is passed unchanged to every call. A model that declares its names in ``model.call_args``
    (the finite networks of :mod:`ntkit.layers`) refuses the others with a ``TypeError``."""
    accepted = getattr(model, "call_args", None)
    out: CallArgs = {}
    for name, v in kwargs.items():
        if isinstance(accepted, tuple) and name not in accepted:
            raise TypeError(f"got an unexpected keyword argument {name!r}: the model reads the "
                            f"call-time arguments "
                            f"{', '.join(repr(a) for a in accepted) if accepted else '(none)'}")
        if isinstance(v, (tuple, list)) and any(_is_array(a) for a in v):
            if len(v) != 2:
                raise ValueError(f"`{name}` must be one array or a pair ({name}1, {name}2) for "
                                 f"(x1, x2), got a {type(v).__name__} of length {len(v)}")
            a1, a2 = v
        elif _is_array(v):
            if n2 is not None:
                raise ValueError(f"x2 is given, so `{name}` must be a pair ({name}1, {name}2): "
                                 f"one array for x1 and one for x2")
            a1, a2 = v, None
        else:
            out[name] = (v, v, False)
            continue
        a1, a2 = check_call_arg_pair(name, a1, a2, n1, n2)
        out[name] = (a1.detach(), None if a2 is None else a2.detach(), True)
    return out


def call_kwargs(args: CallArgs, side: int, rows: Any) -> Dict[str, Any]:
    """The keyword arguments of a call on rows ``rows`` (a slice or an index list) of ``x1``
    (``side`` 1) or ``x2`` (``side`` 2; the rows of ``x1`` when ``x2`` is ``x1``)."""
    out: Dict[str, Any] = {}
    for name, (a1, a2, per_example) in args.items():
        if not per_example:
            out[name] = a1
            continue
        a = a1 if (side == 1 or a2 is None) else a2
        out[name] = a[rows]
    return out


# ------------------------------------------------------------------------------------ the setup
@dataclass
class Setup:
    """A model frozen into a functional form: selected parameters and all other tensors."""
    model: nn.Module
    names: List[str]                       # selected parameter names
    params: Dict[str, torch.Tensor]        # selected, detached, cast
    consts: Dict[str, torch.Tensor]        # other parameters and buffers, detached, cast
    dtype: torch.dtype
    k: int = 1                             # flattened output size per example
    out_shape: Tuple[int, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict)
    call_args: CallArgs = field(default_factory=dict)   # see prepare_call_args

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def numel(self, names: Optional[Sequence[str]] = None) -> int:
        names = self.names if names is None else names
        return sum(self.params[n].numel() for n in names)

    def kwargs(self, side: int, rows: Any) -> Dict[str, Any]:
        """Call-time arguments of rows ``rows`` of ``x1`` (side 1) or ``x2`` (side 2)."""
        return call_kwargs(self.call_args, side, rows) if self.call_args else {}

    @property
    def per_example_args(self) -> bool:
        return any(pe for _, _, pe in self.call_args.values())

    def call(self, x: torch.Tensor, params: Optional[Dict[str, torch.Tensor]] = None,
             names: Optional[Sequence[str]] = None,
             kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """f(x, **kwargs) with the selected parameters replaced by ``params`` (only ``names`` of
        them); ``kwargs``: the call-time arguments of these rows (:meth:`kwargs`)."""
        tensors = dict(self.consts)
        tensors.update(self.params)
        if params is not None:
            tensors.update(params)
        out = functional_call(self.model, tensors, (x,), kwargs or {})
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`model` must return one tensor of shape (batch, ...), got "
                            f"{type(out).__name__}; wrap it to select the output")
        return out

    def flat_call(self, x: torch.Tensor, params=None,
                  kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        out = self.call(x, params, kwargs=kwargs)
        if out.ndim == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"`model` output has shape {tuple(out.shape)} but the batch has "
                             f"{x.shape[0]} examples; the output must be (batch, ...)")
        return out.reshape(x.shape[0], -1)


def make_setup(model: nn.Module, names: List[str], dtype: Optional[torch.dtype]) -> Setup:
    first = next(iter(model.parameters()))
    if dtype is None:
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating torch.dtype (e.g. torch.float64), got "
                        f"{dtype!r}")

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype) if t.is_floating_point() else t

    sel = set(names)
    params: Dict[str, torch.Tensor] = {}
    consts: Dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        (params if n in sel else consts)[n] = cast(p)
    for n, b in model.named_buffers():
        consts[n] = cast(b)
    return Setup(model=model, names=list(names), params=params, consts=consts, dtype=dtype)


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def cast_call_args(args: CallArgs, dtype: torch.dtype, device: torch.device) -> CallArgs:
    """Per-example call-time arguments on the inputs' device, floating ones in ``dtype`` (like
    the inputs)."""
    def cast(a: Any) -> Any:
        return None if a is None else cast_input(a, dtype).to(device)
    return {name: ((cast(a1), cast(a2), True) if pe else (a1, a2, False))
            for name, (a1, a2, pe) in args.items()}


# -------------------------------------------------------------------------- kernel from features
def contract(f1: torch.Tensor, f2: torch.Tensor, output: str) -> torch.Tensor:
    """Kernel block from per-example Jacobian features ``f (b, k, P)``.

    full: (b1, b2, k, k); diagonal: (b1, b2, k); trace: (b1, b2), the mean over outputs of the
    diagonal (neural-tangents' ``trace_axes`` convention).
    """
    b1, k, p = f1.shape
    b2 = f2.shape[0]
    if output == "trace":
        return (f1.reshape(b1, k * p) @ f2.reshape(b2, k * p).T) / k
    if output == "diagonal":
        return torch.bmm(f1.transpose(0, 1), f2.permute(1, 2, 0)).permute(1, 2, 0)
    prod = f1.reshape(b1 * k, p) @ f2.reshape(b2 * k, p).T
    return prod.reshape(b1, k, b2, k).permute(0, 2, 1, 3)


def mirror(block: torch.Tensor, output: str) -> torch.Tensor:
    """Theta(x2, x1) from the block Theta(x1, x2)."""
    if output == "full":
        return block.permute(1, 0, 3, 2)
    if output == "diagonal":
        return block.permute(1, 0, 2)
    return block.T


def empty_kernel(n1: int, n2: int, k: int, output: str, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    shape = {"trace": (n1, n2), "diagonal": (n1, n2, k), "full": (n1, n2, k, k)}[output]
    return torch.zeros(shape, dtype=dtype, device=device)


def schedule(out: torch.Tensor, n1: int, n2: int, sym: bool, row_bytes: float, budget: int,
             features: Callable[[int, int, int], Any],
             contract_fn: Callable[[Any, Any], torch.Tensor], output: str) -> None:
    """Accumulate ``contract_fn(F1, F2)`` into ``out`` over row blocks within ``budget`` bytes.

    ``features(side, start, stop)`` gives the features of rows ``start:stop`` of x1 (side 1) or x2
    (side 2) and costs ``row_bytes`` per row. Features of x2 are cached when they fit in half the
    budget, otherwise recomputed per x1 block. With ``sym`` (x2 is x1) only blocks on and above
    the diagonal are computed and mirrored.
    """
    row_bytes = max(float(row_bytes), 1.0)
    if sym and n1 * row_bytes <= budget:
        f = features(1, 0, n1)
        out += contract_fn(f, f)
        return
    if not sym and (n1 + n2) * row_bytes <= budget:
        out += contract_fn(features(1, 0, n1), features(2, 0, n2))
        return
    rows = max(1, int(budget // (2 * row_bytes)))
    cache = None
    if not sym and n2 * row_bytes <= budget / 2:
        cache = features(2, 0, n2)
        rows = max(1, int((budget - n2 * row_bytes) // row_bytes))
    for i0 in range(0, n1, rows):
        i1 = min(n1, i0 + rows)
        f1 = features(1, i0, i1)
        if cache is not None:
            out[i0:i1] += contract_fn(f1, cache)
            continue
        for j0 in range(i0 if sym else 0, n2, rows):
            j1 = min(n2, j0 + rows)
            f2 = f1 if (sym and j0 == i0) else features(2, j0, j1)
            blk = contract_fn(f1, f2)
            out[i0:i1, j0:j1] += blk
            if sym and j0 != i0:
                out[j0:j1, i0:i1] += mirror(blk, output)
            del f2


# ------------------------------------------------------------------- Jacobian / NTK-vp kernels
def _is_forward_ad_gap(e: Exception) -> bool:
    return isinstance(e, NotImplementedError) and "forward AD" in str(e)


def jvp_any(f: Callable, primals: Any, tangents: Any, need_primal: bool = True):
    """``(f(p), J(p) t)``: forward-mode ``jvp``, or, for ops without forward-mode AD (e.g. the
    fused ``nn.MultiheadAttention`` kernel), the transpose trick ``J t = d/du [J^T u] . t``
    (two reverse passes)."""
    try:
        return jvp(f, (primals,), (tangents,))
    except NotImplementedError as e:
        if not _is_forward_ad_gap(e):
            raise
    return double_vjp(f, primals, tangents, need_primal)


def _math_attention():
    """Force scaled_dot_product_attention's math backend (twice differentiable everywhere)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - older torch
        import contextlib
        return contextlib.nullcontext()


def double_vjp(f: Callable, primals: Any, tangents: Any, need_primal: bool = True):
    with _math_attention():
        out = f(primals) if need_primal else None
        shape_src = out if out is not None else f(primals)

        def g(u):
            return vjp(f, primals)[1](u)[0]

        zeros = torch.zeros_like(shape_src)
        return out, vjp(g, zeros)[1](tangents)[0]



def chunk_names(setup: Setup, names: Sequence[str], max_numel: int) -> List[List[str]]:
    """Group parameter tensors into chunks of at most ``max_numel`` entries (a bigger tensor is a
    chunk on its own)."""
    chunks: List[List[str]] = []
    cur: List[str] = []
    size = 0
    for n in names:
        m = setup.params[n].numel()
        if cur and size + m > max_numel:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += m
    if cur:
        chunks.append(cur)
    return chunks


def _is_vmap_gap(e: Exception) -> bool:
    """vmap cannot trace this model on batched call-time arguments (data-dependent control
    flow or ``.item()`` on them, e.g. a layer validating its graph pattern)."""
    return isinstance(e, RuntimeError) and "vmap" in str(e)


def jacobian_features(setup: Setup, names: Sequence[str], x: torch.Tensor,
                      kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """Per-example Jacobian (b, k, P_names) by ``vmap(jacrev)`` over single examples.

    ``kwargs``: the call-time arguments of these rows (per-example arrays are mapped over with
    the examples). When vmap cannot trace the model called with them (data-dependent checks of
    an argument, e.g. ``Aggregate`` validating its pattern, or of the masks ``mask_constant``
    selects), the examples are differentiated one at a time (``jacrev`` per example: the same
    numbers, a Python loop)."""
    sub = {n: setup.params[n] for n in names}
    kwargs = kwargs or {}
    per = {k: v for k, v in kwargs.items() if k in setup.call_args and setup.call_args[k][2]}
    const = {k: v for k, v in kwargs.items() if k not in per}

    def f_single(p, xi, ai):
        kw = dict(const)
        kw.update({k: v.unsqueeze(0) for k, v in ai.items()})
        return setup.flat_call(xi.unsqueeze(0), p, kwargs=kw).reshape(-1)

    b = x.shape[0]
    jac = None
    if not setup.extra.get("loop_call_args", False):
        try:
            jac = vmap(jacrev(f_single), in_dims=(None, 0, 0))(sub, x, per)
        except RuntimeError as e:
            if not (kwargs and _is_vmap_gap(e)):
                raise
            setup.extra["loop_call_args"] = True   # remembered for the other blocks
    if jac is None:
        rows = [jacrev(f_single)(sub, x[i], {k: v[i] for k, v in per.items()})
                for i in range(b)]
        jac = {n: torch.stack([r[n] for r in rows]) for n in names}
    return torch.cat([jac[n].reshape(b, setup.k, -1) for n in names], dim=2)


def jacobian_kernel(setup: Setup, names: Sequence[str], x1: torch.Tensor,
                    x2: Optional[torch.Tensor], output: str, budget: int,
                    out: torch.Tensor) -> None:
    """Jacobian contraction, chunked over parameter tensors and row blocks to fit ``budget``."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    rows_all = n1 + (0 if x2 is None else n2)
    act = setup.extra.get("act_numel", 0)
    per_param = setup.k * setup.itemsize * 2  # features + transient jacrev copy
    # a chunk that lets all rows fit at once, but never below one tensor
    max_numel = max(1, int(budget // max(1, rows_all * per_param)))
    for chunk in chunk_names(setup, names, max_numel):
        pc = setup.numel(chunk)
        row_bytes = setup.k * setup.itemsize * (2 * pc + act)

        def feats(side, a, b, chunk=chunk):
            s = 1 if (side == 1 or x2 is None) else 2
            xs = x1 if s == 1 else x2
            return jacobian_features(setup, chunk, xs[a:b], setup.kwargs(s, slice(a, b)))

        schedule(out, n1, n2, x2 is None, row_bytes, budget, feats,
                 lambda f1, f2: contract(f1, f2, output), output)


def ntk_vp_kernel(setup: Setup, names: Sequence[str], x1: torch.Tensor,
                  x2: Optional[torch.Tensor], output: str, budget: int,
                  out: torch.Tensor) -> None:
    """NTK-vector products: column (j, b) of the kernel is J(x1) v with v = J(x2_j)^T e_b, a jvp.

    Only ``c`` parameter-space vectors are held at a time (``c`` from the budget); no (n, P)
    Jacobian of x1 is ever formed.
    """
    xs2 = x1 if x2 is None else x2
    n1, n2, k = x1.shape[0], xs2.shape[0], setup.k
    P = setup.numel(names)
    act = setup.extra.get("act_numel", 0)
    per_col = setup.itemsize * (3 * P + 3 * n1 * max(act, k))
    cols = max(1, int(budget // max(per_col, 1)))
    ex_per_block = max(1, cols // k)
    primals = {n: setup.params[n] for n in names}
    kw1 = setup.kwargs(1, slice(None))

    def f_x1(p):
        return setup.flat_call(x1, p, kwargs=kw1)

    def one_column(t):
        return jvp(f_x1, (primals,), (t,))[1]           # (n1, k)

    def one_column_rev(t):
        return double_vjp(f_x1, primals, t, need_primal=False)[1]

    for j0 in range(0, n2, ex_per_block):
        j1 = min(n2, j0 + ex_per_block)
        J2 = {}
        b = j1 - j0
        jac = jacobian_features(setup, names, xs2[j0:j1],
                                setup.kwargs(1 if x2 is None else 2, slice(j0, j1)))  # (b,k,P)
        off = 0
        for n in names:
            m = setup.params[n].numel()
            J2[n] = jac[:, :, off:off + m].reshape(b * k, *setup.params[n].shape)
            off += m
        del jac
        try:
            cols_out = vmap(one_column)(J2)                 # (b*k, n1, k)
        except NotImplementedError as e:
            if not _is_forward_ad_gap(e):
                raise
            one_column = one_column_rev                     # this model lacks forward AD
            cols_out = vmap(one_column)(J2)
        full = cols_out.reshape(b, k, n1, k).permute(2, 0, 3, 1)  # (n1, b, k_x1, k_x2)
        if output == "full":
            out[:, j0:j1] += full
        elif output == "diagonal":
            out[:, j0:j1] += torch.diagonal(full, dim1=2, dim2=3)
        else:
            out[:, j0:j1] += torch.diagonal(full, dim1=2, dim2=3).mean(-1)
