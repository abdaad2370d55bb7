"""Structured empirical NTK: use the layer structure instead of per-example autograd Jacobians.

For a Linear layer y_t = W a_t + b applied at positions t (sequence positions, and repeated calls
of a shared module), the per-example Jacobian of output ``o`` w.r.t. ``[W | b]`` is
``sum_t delta_{o,t} (x) [a_t, 1]`` with ``delta_{o,t} = d f_o / d y_t``. Its contribution to the
NTK is therefore either

* ``A`` (explicit): build that (k, P_layer) Jacobian per example with one einsum and contract, or
* ``B`` (Gram): ``sum_{t,t'} ([a_t,1].[a'_t',1]) (delta_{o,t}.delta'_{o',t'})`` without forming it,

whichever costs fewer flops for the layer (for a plain MLP, ``B``: two small Gram matrices per
layer). Conv1d/Conv2d are the same with ``a_t`` the unfolded input patch at output pixel ``t``
(per group). Activations ``a`` come from forward hooks; all deltas come from ``k`` batched
backward passes through the outputs (valid because examples do not interact, which the caller
checks). Parameters of any other module, and Linear/Conv weights used anywhere outside their own
module's forward (tied weights, ``nn.MultiheadAttention.out_proj``), fall back to autograd
Jacobians. That detection runs once on a 2-example probe under a ``TorchFunctionMode``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._common import Setup, contract, schedule
from .._settings import settings
from ..layers.dense import AffineModule

__all__: List[str] = []


# ------------------------------------------------------------------------- supported modules
def _kind(m: nn.Module) -> Optional[str]:
    """'linear' / 'conv1d' / 'conv2d' if ``m`` computes exactly the standard affine map."""
    try:
        from torch.nn.utils import parametrize
        if parametrize.is_parametrized(m):
            return None
    except Exception:  # pragma: no cover - very old torch
        pass
    if m._forward_pre_hooks or m._forward_hooks:
        return None  # a user hook may change the input or the output
    own = dict(m.named_parameters(recurse=False))
    if "weight" not in own or not set(own) <= {"weight", "bias"}:
        return None
    t = type(m)
    if isinstance(m, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    affine: Optional[type] = None
    try:  # ntkit's own NTK-parameterized Dense module: w_scale * W x + b_scale * b over axis 1
        affine = AffineModule
    except Exception:  # pragma: no cover - core layers unavailable
        pass
    if affine is not None and t is affine and hasattr(m, "w_scale") and hasattr(m, "b_scale"):
        return "affine"
    for cls, name in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d")):
        if (isinstance(m, cls) and t.forward is cls.forward
                and getattr(t, "_conv_forward", None) is cls._conv_forward):
            return name
    return None


@dataclass
class _Layer:
    name: str                 # module name
    module: Any               # nn.Linear, Conv1d/2d or AffineModule (per `kind`)
    kind: str
    wname: Optional[str]      # selected weight param name (None if not selected)
    bname: Optional[str]      # selected bias param name
    bdim: int = 0             # batch dim of the module input/output
    groups: int = 1
    L: int = 1                # positions per example (all calls together)
    c: int = 0                # patch size per group (+1 with bias)
    o: int = 0                # output channels per group
    method: str = "B"
    wscale: float = 1.0       # the layer computes wscale * W a + bscale * b
    bscale: float = 1.0
    calls: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def P(self) -> int:
        return self.groups * self.o * self.c


class _UsageMode(TorchFunctionMode):
    """Flags watched tensors used by any op outside the forward of the module owning them."""

    def __init__(self, watch: Dict[int, str], stack: List[str]):
        super().__init__()
        self.watch, self.stack = watch, stack
        self.bad: Set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) in self.watch:
                owner = self.watch[id(t)]
                if not self.stack or self.stack[-1] != owner:
                    self.bad.add(owner)
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------ patches/deltas
def _conv_geometry(m: Any, kind: str):
    """(kernel, stride, dilation, pads) as 2-D tuples; pads = (left, right, top, bottom)."""
    if kind == "conv1d":
        kk, st, dl = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
    else:
        kk, st, dl = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    spatial = m.kernel_size if kind == "conv2d" else (m.kernel_size[0],)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pads1d = [(0, 0)] * len(spatial)
        else:  # 'same': total d*(k-1), the extra one on the right (as torch does)
            pads1d = []
            for d, kdim in zip(m.dilation, spatial):
                tot = d * (kdim - 1)
                pads1d.append((tot // 2, tot - tot // 2))
    else:
        pads1d = [(p, p) for p in m.padding]
    if kind == "conv1d":
        pads1d = [(0, 0)] + pads1d
    (t, b), (l, r) = pads1d
    return kk, st, dl, (l, r, t, b)


def _patches(x: torch.Tensor, lay: _Layer) -> torch.Tensor:
    """(b, g, L, c_in_group) patches of a conv input (b, C, ...)."""
    m = lay.module
    kk, st, dl, pads = _conv_geometry(m, lay.kind)
    if lay.kind == "conv1d":
        x = x.unsqueeze(2)
    mode = m.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
    p = F.unfold(x, kk, dilation=dl, stride=st)                 # (b, C*kh*kw, L)
    b, ck, L = p.shape
    g = m.groups
    return p.reshape(b, g, ck // g, L).transpose(2, 3)


def _acts(lay: _Layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Activations (b, g, L, c) of one call (None when only the bias is selected)."""
    if lay.wname is None:
        return None
    if lay.kind == "linear":
        x = x.movedim(lay.bdim, 0)
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])
    if lay.kind == "affine":
        if x.ndim > 2:
            x = x.movedim(1, -1)
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])    # wscale: applied by the caller
    return _patches(x, lay)


def _deltas(lay: _Layer, d: torch.Tensor) -> torch.Tensor:
    """Deltas (b, k, g, L, o) from d f / d y stacked as (k, *y.shape)."""
    k = d.shape[0]
    if lay.kind == "linear":
        d = d.movedim(lay.bdim + 1, 1)                            # (k, b, ..., out)
        d = d.reshape(k, d.shape[1], 1, -1, d.shape[-1])          # (k, b, 1, T, out)
    elif lay.kind == "affine":
        if d.ndim > 3:
            d = d.movedim(2, -1)
        d = d.reshape(k, d.shape[1], 1, -1, d.shape[-1])
    else:
        b, cout = d.shape[1], d.shape[2]
        d = d.reshape(k, b, lay.groups, cout // lay.groups, -1).transpose(3, 4)  # (k,b,g,L,o)
    return d.transpose(0, 1)


# ------------------------------------------------------------------------------------- planning
class Plan:
    """Which modules are handled structurally, which parameter names fall back, and costs."""

    def __init__(self, layers: List[_Layer], leftover: List[str], fwd_flops: float,
                 act_numel: int, bwd_flops: Optional[float] = None):
        self.layers, self.leftover = layers, leftover
        self.fwd_flops, self.act_numel = fwd_flops, act_numel
        # flops of one backward pass to the layer outputs (input gradients only)
        self.bwd_flops = fwd_flops if bwd_flops is None else bwd_flops

    def choose(self, n1: int, n2: int, sym: bool, k: int, output: str) -> None:
        for lay in self.layers:
            a, b = layer_costs(lay, n1, n2, sym, k, output)
            lay.method = settings.empirical_method or ("A" if a < b else "B")

    def cost(self, n1: int, n2: int, sym: bool, k: int, output: str) -> float:
        nf = n1 + (0 if sym else n2)
        total = nf * (self.fwd_flops + k * self.bwd_flops)
        for lay in self.layers:
            total += min(layer_costs(lay, n1, n2, sym, k, output))
        return total


def layer_costs(lay: _Layer, n1: int, n2: int, sym: bool, k: int, output: str):
    """Flops of the explicit-Jacobian (A) and Gram (B) contraction of one layer."""
    nf = n1 + (0 if sym else n2)
    kp = k * k if output == "full" else k
    g, L, c, o = lay.groups, lay.L, lay.c, lay.o
    cost_a = 2.0 * nf * k * g * L * o * c + 2.0 * n1 * n2 * kp * lay.P
    cost_b = n1 * n2 * g * L * L * (2.0 * c + 2.0 * kp * o + kp)
    return cost_a, cost_b


def make_plan(setup: Setup, x: torch.Tensor) -> Plan:
    """Probe the model on 1 and 2 examples: find structured layers, batch dims and sizes."""
    model = setup.model
    selected = set(setup.names)
    candidates: Dict[str, _Layer] = {}
    for mname, m in model.named_modules():
        kind = _kind(m)
        if kind is None:
            continue
        prefix = mname + "." if mname else ""
        w, b = prefix + "weight", prefix + "bias"
        candidates[mname] = _Layer(mname, m, kind, w if w in selected else None,
                                   b if (b in selected and getattr(m, "bias", None) is not None)
                                   else None)

    # parameters registered under several names are shared: never structured
    seen: Dict[int, str] = {}
    shared = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.update({pname, seen[id(p)]})
        seen[id(p)] = pname

    tensors = dict(setup.consts)
    tensors.update(setup.params)
    records: Dict[str, List[List[Tuple[torch.Size, torch.Size]]]] = {
        n: [[], []] for n in candidates}
    stack: List[str] = []
    needs_input_grad: Dict[str, List[bool]] = {n: [] for n in candidates}
    # run 0 has grad on (to see which layer inputs need a backward pass), run 1 watches usage
    grad_tensors = dict(tensors)
    grad_tensors.update({n: p.detach().requires_grad_(True) for n, p in setup.params.items()})
    state = {"run": 0, "tensors": grad_tensors}
    handles = []
    for mname, lay in candidates.items():
        def pre(mod, inp, mname=mname):
            stack.append(mname)

        def post(mod, inp, out, mname=mname, lay=lay):
            stack.pop()
            if not _uses_ours(mod, lay, state["tensors"]):
                return  # called with other weights (e.g. a nested functional_call)
            if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
                records[mname][state["run"]].append((inp[0].shape, out.shape))
                if state["run"] == 0:
                    needs_input_grad[mname].append(bool(inp[0].requires_grad))
            else:
                records[mname][state["run"]].append((None, None))
        handles.append(lay.module.register_forward_pre_hook(pre))
        handles.append(lay.module.register_forward_hook(post))

    n = x.shape[0]
    two = [0, min(1, n - 1)]
    probe = [x[:1], x[two]]
    probe_kw = [setup.kwargs(1, slice(0, 1)), setup.kwargs(1, two)]
    watch = {}
    for mname, lay in candidates.items():
        for pn in (lay.wname, lay.bname):
            if pn is not None:
                watch[id(tensors[pn])] = mname
    mode = _UsageMode(watch, stack)
    fwd_flops = bwd_flops = 0.0
    try:
        with torch.enable_grad():
            setup.call(probe[0], grad_tensors, kwargs=probe_kw[0])
        with torch.no_grad():
            state["run"], state["tensors"] = 1, tensors
            stack.clear()
            with mode:
                setup.call(probe[1], kwargs=probe_kw[1])
    finally:
        for h in handles:
            h.remove()

    act_numel = 0
    layers: List[_Layer] = []
    for mname, lay in candidates.items():
        r1, r2 = records[mname]
        ok = bool(r1) and len(r1) == len(r2) and mname not in mode.bad
        bdim = None
        if ok:
            for (i1, o1), (i2, o2) in zip(r1, r2):
                if i1 is None or i1.numel() == 0:
                    ok = False
                    break
                diff = [d for d in range(len(i1)) if i1[d] != i2[d]]
                if (len(diff) != 1 or len(i1) != len(o1) or len(i2) != len(o2)
                        or i1[diff[0]] != 1 or i2[diff[0]] != 2 or o1[diff[0]] != 1
                        or o2[diff[0]] != 2):
                    ok = False
                    break
                if bdim is not None and bdim != diff[0]:
                    ok = False
                    break
                bdim = diff[0]
            if ok and lay.kind == "linear" and bdim == len(r1[0][0]) - 1:
                ok = False
            if ok and lay.kind != "linear" and bdim != 0:
                ok = False
        # FLOPs of the forward pass (all candidate modules, selected or not)
        mod = lay.module
        for (i1, o1), needs in zip(r1, needs_input_grad[mname] + [True] * len(r1)):
            if i1 is None:
                continue
            if lay.kind == "linear":
                fl = 2.0 * o1.numel() * mod.in_features
            elif lay.kind == "affine":
                fl = 2.0 * o1.numel() * mod.in_dim
            else:
                fl = 2.0 * o1.numel() * mod.weight[0].numel()
            fwd_flops += fl
            bwd_flops += fl if needs else 0.0   # input-gradient GEMM of the backward pass
            act_numel += i1.numel() + o1.numel()
        if not ok or bdim is None or (lay.wname is None and lay.bname is None):
            continue
        if {lay.wname, lay.bname} & shared:
            continue
        lay.bdim = bdim
        lay.groups = mod.groups if lay.kind.startswith("conv") else 1
        if lay.kind == "linear":
            lay.L = sum(i1.numel() // i1[bdim] // mod.in_features for i1, _ in r1)
            lay.c, lay.o = mod.in_features, mod.out_features
        elif lay.kind == "affine":
            lay.L = sum(i1.numel() // i1[0] // mod.in_dim for i1, _ in r1)
            lay.c, lay.o = mod.in_dim, mod.out_dim
            lay.wscale, lay.bscale = float(mod.w_scale), float(mod.b_scale)
        else:
            spatial = sum(o1[2:].numel() for _, o1 in r1)
            lay.L = spatial
            lay.c = mod.weight[0].numel()
            lay.o = mod.out_channels // mod.groups
        if lay.wname is None:
            lay.c = 0
        if lay.bname is not None:
            lay.c += 1
        layers.append(lay)
    covered = {pn for lay in layers for pn in (lay.wname, lay.bname) if pn is not None}
    leftover = [nm for nm in setup.names if nm not in covered]
    p_other = sum(setup.params[nm].numel() for nm in leftover)
    fwd_flops += 2.0 * p_other  # rough: each remaining parameter used about once per example
    bwd_flops += 2.0 * p_other
    return Plan(layers, leftover, max(fwd_flops, 1.0), act_numel, bwd_flops)


def _uses_ours(mod: nn.Module, lay: _Layer, tensors: Dict[str, torch.Tensor]) -> bool:
    """Whether this call of ``mod`` runs with the parameter tensors the kernel differentiates."""
    if lay.wname is None and lay.bname is None:
        p = tensors.get((lay.name + "." if lay.name else "") + "weight")
        return p is None or mod.weight is p
    return ((lay.wname is None or mod.weight is tensors[lay.wname])
            and (lay.bname is None or mod.bias is tensors[lay.bname]))


# ----------------------------------------------------------------------------------- features
def _features(setup: Setup, plan: Plan, x: torch.Tensor,
              kwargs: Optional[Dict[str, Any]] = None) -> List[torch.Tensor]:
    """Per-layer features of rows ``x`` (``kwargs``: their call-time arguments): A-layers give
    (b, k, P); B-layers give (acts, deltas)."""
    layers = plan.layers
    handles = []
    tensors = {n: p.detach().requires_grad_(True) for n, p in setup.params.items()}
    for lay in layers:
        lay.calls = []

        def hook(mod, inp, out, lay=lay):
            if _uses_ours(mod, lay, tensors):
                lay.calls.append((inp[0].detach(), out))
        handles.append(lay.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = setup.flat_call(x, tensors, kwargs=kwargs)
        outs = [o for lay in layers for (_, o) in lay.calls]
    finally:
        for h in handles:
            h.remove()
    k = setup.k
    live = [i for i, o in enumerate(outs) if o.requires_grad] if out.requires_grad else []
    grads: List[List[torch.Tensor]] = [[] if i in live else [torch.zeros_like(o)] * k
                                       for i, o in enumerate(outs)]
    if live:
        for a in range(k):
            g = torch.autograd.grad(out[:, a].sum(), [outs[i] for i in live],
                                    retain_graph=a < k - 1, allow_unused=True)
            for i, gi in zip(live, g):
                grads[i].append(gi if gi is not None else torch.zeros_like(outs[i]))
    feats: List[Any] = []
    pos = 0
    with torch.no_grad():
        for lay in layers:
            acts: List[Any] = []        # all None when only the bias is selected
            dels: List[torch.Tensor] = []
            if not lay.calls:
                raise RuntimeError(
                    f"module {lay.name!r} ran in the probe but not on this batch (input-dependent "
                    "control flow); use implementation='jacobian' for this model")
            for (inp, _o) in lay.calls:
                acts.append(_acts(lay, inp))
                gs = grads[pos]
                dels.append(_deltas(lay, (gs[0].unsqueeze(0) if len(gs) == 1
                                          else torch.stack(gs, 0)).detach()))
                pos += 1
            A = None if acts[0] is None else (acts[0] if len(acts) == 1
                                              else torch.cat(acts, dim=2))  # (b, g, L, c)
            D = dels[0] if len(dels) == 1 else torch.cat(dels, dim=3)      # (b, k, g, L, o)
            if lay.method == "A":
                parts = []
                if A is not None:
                    J = torch.einsum("bglc,bkglo->bkgoc", A, D)
                    if lay.wscale != 1.0:
                        J.mul_(lay.wscale)
                    parts.append(J.reshape(J.shape[0], k, -1))
                if lay.bname is not None:
                    db = D.sum(3).reshape(D.shape[0], k, -1)
                    parts.append(db * lay.bscale if lay.bscale != 1.0 else db)
                feats.append(parts[0] if len(parts) == 1 else torch.cat(parts, 2))
            else:
                feats.append((A, D, lay.bscale ** 2 if lay.bname is not None else 0.0,
                              lay.wscale ** 2))
            lay.calls = []
    return feats


def _gram_block(A1, D1, A2, D2, bias: float, output: str, ascale: float = 1.0) -> torch.Tensor:
    """Contribution of one B-layer: sum_{g,l,m} (ascale a.a' + bias)(delta.delta') for all row
    pairs (``bias`` = squared bias scale, 0 without a selected bias; ``ascale`` = squared
    weight scale of an ntkit ``Dense``, applied to the ``b1 x b2`` Gram instead of the
    activations)."""
    b1, k, g, L, o = D1.shape
    b2, M = D2.shape[0], D2.shape[3]
    if L == 1 and M == 1 and g == 1:
        if A1 is not None:
            Ga = A1[:, 0, 0] @ A2[:, 0, 0].T                               # (b1, b2)
            if ascale != 1.0:
                Ga *= ascale
            if bias:
                Ga += bias
        d1, d2 = D1[:, :, 0, 0], D2[:, :, 0, 0]                            # (b, k, o)
        if output == "trace":
            Gd = (d1.reshape(b1, k * o) @ d2.reshape(b2, k * o).T)
            Gd /= k
            return Gd.mul_(Ga) if A1 is not None else Gd.mul_(bias)
        if output == "diagonal":
            Gd = torch.bmm(d1.transpose(0, 1), d2.permute(1, 2, 0)).permute(1, 2, 0)
            return Gd * Ga[:, :, None] if A1 is not None else Gd * bias
        Gd = (d1.reshape(b1 * k, o) @ d2.reshape(b2 * k, o).T).reshape(b1, k, b2, k)
        Gd = Gd.permute(0, 2, 1, 3)
        return Gd * Ga[:, :, None, None] if A1 is not None else Gd * bias
    if A1 is not None:
        c = A1.shape[3]
        a1 = A1.permute(1, 0, 2, 3).reshape(g, b1 * L, c)
        a2 = A2.permute(1, 0, 2, 3).reshape(g, b2 * M, c)
        Ga = torch.bmm(a1, a2.transpose(1, 2)).reshape(g, b1, L, b2, M)
        if ascale != 1.0:
            Ga *= ascale
        if bias:
            Ga += bias
    else:
        Ga = torch.full((g, b1, L, b2, M), bias, dtype=D1.dtype, device=D1.device)
    if output == "trace":
        d1 = D1.permute(2, 0, 3, 1, 4).reshape(g, b1 * L, k * o)
        d2 = D2.permute(2, 0, 3, 1, 4).reshape(g, b2 * M, k * o)
        Gd = torch.bmm(d1, d2.transpose(1, 2)).reshape(g, b1, L, b2, M)
        return (Ga * Gd).sum(dim=(0, 2, 4)) / k
    if output == "diagonal":
        d1 = D1.permute(1, 2, 0, 3, 4).reshape(k * g, b1 * L, o)
        d2 = D2.permute(1, 2, 0, 3, 4).reshape(k * g, b2 * M, o)
        Gd = torch.bmm(d1, d2.transpose(1, 2)).reshape(k, g, b1, L, b2, M)
        return torch.einsum("giljm,agiljm->ija", Ga, Gd)
    d1 = D1.permute(2, 0, 3, 1, 4).reshape(g, b1 * L * k, o)
    d2 = D2.permute(2, 0, 3, 1, 4).reshape(g, b2 * M * k, o)
    Gd = torch.bmm(d1, d2.transpose(1, 2)).reshape(g, b1, L, k, b2, M, k)
    return torch.einsum("giljm,gilajmb->ijab", Ga, Gd)


def _rows(A, i0, r):
    return None if A is None else A[i0:i0 + r]


def structured_kernel(setup: Setup, plan: Plan, x1: torch.Tensor, x2: Optional[torch.Tensor],
                      output: str, budget: int, out: torch.Tensor) -> None:
    """Accumulate the structured layers' NTK into ``out`` (leftover params are the caller's)."""
    if not plan.layers:
        return
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    sym = x2 is None
    plan.choose(n1, n2, sym, setup.k, output)
    k = setup.k
    kp = k * k if output == "full" else k
    row = 0.0
    for lay in plan.layers:
        if lay.method == "A":
            row += k * lay.P + lay.groups * lay.L * (lay.c + k * lay.o)  # transient A, D too
        else:
            row += lay.groups * lay.L * (lay.c + k * lay.o)
    row += (1 + k) * plan.act_numel
    row_bytes = row * setup.itemsize

    def feats(side, a, b):
        s = 1 if (side == 1 or x2 is None) else 2
        xs = x1 if s == 1 else x2
        return _features(setup, plan, xs[a:b], setup.kwargs(s, slice(a, b)))

    def contract_fn(f1, f2):
        total = None
        a_feats1 = [f for f, lay in zip(f1, plan.layers) if lay.method == "A"]
        if a_feats1:
            j1 = a_feats1[0] if len(a_feats1) == 1 else torch.cat(a_feats1, 2)
            if f2 is f1:                                # a diagonal block: symmetric
                j2 = j1
            else:
                a_feats2 = [f for f, lay in zip(f2, plan.layers) if lay.method == "A"]
                j2 = a_feats2[0] if len(a_feats2) == 1 else torch.cat(a_feats2, 2)
            total = contract(j1, j2, output)
        for fa, fb, lay in zip(f1, f2, plan.layers):
            if lay.method != "B":
                continue
            (A1, D1, bias, ascale), (A2, D2, _, _) = fa, fb
            # sub-block rows so the (b1, b2, g, L, L, kp) Gram stays within the budget
            pair = lay.groups * lay.L * lay.L * (1 + kp) * setup.itemsize * 2
            r = max(1, int((budget / max(pair, 1)) ** 0.5))
            if r >= D1.shape[0] and r >= D2.shape[0]:
                blk = _gram_block(A1, D1, A2, D2, bias, output, ascale)
            else:
                rows = []
                for i0 in range(0, D1.shape[0], r):
                    cols = [_gram_block(_rows(A1, i0, r), D1[i0:i0 + r], _rows(A2, j0, r),
                                        D2[j0:j0 + r], bias, output, ascale)
                            for j0 in range(0, D2.shape[0], r)]
                    rows.append(torch.cat(cols, 1))
                blk = torch.cat(rows, 0)
            total = blk if total is None else total + blk
        return total

    schedule(out, n1, n2, sym, row_bytes, budget, feats, contract_fn, output)
