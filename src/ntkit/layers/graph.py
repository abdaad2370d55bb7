"""Graph aggregation (neural-tangents' ``stax.Aggregate``): graph neural networks and the GNTK.

Inputs are ``(N, C, *nodes)`` (channels first, like every ntkit layer): usually ``(N, C, V)``
for graphs with ``V`` vertices (pad smaller graphs with isolated vertices), or several node
axes of which ``aggregate_axis`` are aggregated. Each example comes with its adjacency
``pattern``, passed at call time as in neural-tangents::

    arch.kernel(x1, x2, get='ntk', pattern=(pattern1, pattern2))   # pattern=p when x2 is None
    net = arch.module(in_shape); net(x, pattern=p)

``Aggregate`` replaces every vertex by the (weighted) sum of its direct predecessors:
``y[n, c, j] = sum_i x[n, c, i] A[n, i, j]`` (``A[n, i, j] = w``: an arc ``i -> j`` of weight
``w``; add the identity to ``A`` to keep the vertex itself, as GIN/GNTK do). Pattern formats:

* ``implementation='DENSE'``: ``A`` of shape ``(N, *G, *G)`` (``G`` the sizes of the
  aggregated axes), any real dtype; ``to_dense(pattern)`` is applied first when given (a
  function of one per-example batch of patterns, keeping the batch on the leading axis).
* ``implementation='SPARSE'``: integer arcs ``(N, n_edges, K, 2)`` (``K`` aggregated axes;
  ``(N, n_edges, 2)`` when ``K = 1``), ``[..., 0]`` the tail (sender) and ``[..., 1]`` the
  head (receiver) coordinates; repeated arcs add up. An arc whose head has a negative
  coordinate is padding and ignored (graphs with fewer arcs); a negative tail with a valid
  head, or a coordinate beyond the axis size, is refused (neural-tangents would silently wrap
  it to another vertex).

Kernel map (exact for any finite pattern): with the pixel-pair covariance ``K[n1, n2]`` of
shape ``(V, V)`` per non-aggregated position, ``K'[n1, n2] = A[n1]^T K[n1, n2] A[n2]`` for the
NNGP and the NTK alike (the layer is linear and has no parameters). It needs the full
pixel-pair layout (like pooling); cost ``O(V^3)`` per kernel entry (DENSE) or
``O(V E)`` (SPARSE, ``E`` arcs). Graph-level outputs: ``GlobalSumPool()`` /
``GlobalAvgPool()`` over the nodes, then ``Dense``.

Example (a 2-layer GIN-style GNTK, graphs of 8 vertices with 5 features)::

    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Dense(256), nl.Relu(), nl.Aggregate(),
    ...                  nl.Dense(256), nl.Relu(), nl.Aggregate(),
    ...                  nl.GlobalSumPool(), nl.Dense(1))
    >>> x = torch.randn(4, 5, 8, dtype=torch.float64)
    >>> a = (torch.rand(4, 8, 8) < 0.3).double() + torch.eye(8)
    >>> arch.kernel(x, get='ntk', pattern=a).shape
    torch.Size([4, 4])
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

from .._validation import all_finite
from ..kernel import Kernel
from ._base import BuildContext, Layer, call_arg, frozen_layer
from ._masking import unwrap, wrap
from ._ops import memo_self, set_batch_diag
from . import _feature_ops as fo

__all__ = ["Aggregate"]

IMPLEMENTATIONS = ("DENSE", "SPARSE")


def _check_axis_arg(aggregate_axis):
    if aggregate_axis is None:
        return None
    items = aggregate_axis if isinstance(aggregate_axis, (tuple, list)) else (aggregate_axis,)
    if not items or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                        for a in items):
        raise TypeError(f"`aggregate_axis` must be None, an int or a tuple of ints (axes of the "
                        f"(N, C, *nodes) inputs), got {aggregate_axis!r}")
    return tuple(int(a) for a in items) if isinstance(aggregate_axis, (tuple, list)) \
        else int(aggregate_axis)


class _Geometry:
    """Aggregated axes of per-example inputs ``(C, *S)``: ``agg``/``rest`` index the spatial
    axes ``S`` (0-based), ``g``/``r`` the products of their sizes."""

    def __init__(self, layer: "Aggregate", in_shape: Tuple[int, ...]):
        ns = len(in_shape) - 1
        if ns < 1:
            raise ValueError(f"Aggregate needs graph inputs (N, C, *nodes), e.g. (N, C, V); got "
                             f"per-example shape {tuple(in_shape)}. Put it before "
                             f"GlobalSumPool/Flatten, and reshape node features (N, V, C) with "
                             f"x.movedim(-1, 1)")
        ndim = ns + 2
        if layer.aggregate_axis is None:
            axes = tuple(range(2, ndim))
        else:
            raw = layer.aggregate_axis if isinstance(layer.aggregate_axis, tuple) \
                else (layer.aggregate_axis,)
            found: List[int] = []
            for a in raw:
                if not -ndim <= a < ndim or (a % ndim) < 2:
                    raise ValueError(
                        f"Aggregate: `aggregate_axis` {a} is not a node axis of inputs "
                        f"(N, C, *nodes) with {ndim} axes; use axes in 2..{ndim - 1} "
                        f"(or negative); ntkit keeps channels on axis 1")
                found.append(a % ndim)
            if len(set(found)) != len(found):
                raise ValueError(f"Aggregate: `aggregate_axis` {layer.aggregate_axis!r} repeats "
                                 f"an axis")
            axes = tuple(sorted(found))
        sp = tuple(in_shape[1:])
        self.ns = ns
        self.agg = tuple(a - 2 for a in axes)
        self.rest = tuple(d for d in range(ns) if d not in self.agg)
        self.sp = sp
        self.agg_shape = tuple(sp[d] for d in self.agg)
        self.rest_shape = tuple(sp[d] for d in self.rest)
        self.g = int(np.prod(self.agg_shape, dtype=np.int64))
        self.r = int(np.prod(self.rest_shape, dtype=np.int64))


# ---- patterns -------------------------------------------------------------------------------

def _as_tensor(p: Any, what: str) -> torch.Tensor:
    if isinstance(p, np.ndarray):
        p = torch.from_numpy(np.ascontiguousarray(p))
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(p).__name__}")
    return p


def _dense_pattern(layer: "Aggregate", p: Any, geo: _Geometry, n: int, dtype, device,
                   name: str) -> torch.Tensor:
    """The dense adjacency ``(n, g, g)`` in ``dtype``."""
    if layer.to_dense is not None:
        p = layer.to_dense(p)
        name = f"to_dense({name})"
    p = _as_tensor(p, f"`{name}`")
    want = (n,) + geo.agg_shape + geo.agg_shape
    if tuple(p.shape) != want:
        raise ValueError(
            f"`{name}` has shape {tuple(p.shape)} but Aggregate(implementation='DENSE') needs "
            f"(batch, *nodes, *nodes) = {want}: one (weighted) adjacency matrix per example, "
            f"A[n, i, j] = weight of the arc i -> j. For edge lists (n, n_edges, 2) use "
            f"implementation='SPARSE'")
    if p.is_complex():
        raise TypeError(f"`{name}` must be real, got {p.dtype}")
    p = p.to(device=device, dtype=dtype)
    if not all_finite(p):
        raise ValueError(f"`{name}` has NaN/Inf weights (or weights beyond {dtype})")
    return p.reshape(n, geo.g, geo.g)


def _sparse_pattern(p: Any, geo: _Geometry, n: int, dtype, device, name: str):
    """``(tails, heads, weights)`` of shape ``(n, E)``: flat vertex indices and 1/0 weights
    (0 for padding arcs, whose indices are set to 0)."""
    p = _as_tensor(p, f"`{name}`")
    k = len(geo.agg)
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer vertex indices for "
                        f"Aggregate(implementation='SPARSE'), got dtype {p.dtype}")
    if p.ndim == 3 and k == 1:
        p = p.unsqueeze(2)
    if p.ndim != 4 or p.shape[0] != n or p.shape[2] != k or p.shape[3] != 2:
        raise ValueError(
            f"`{name}` has shape {tuple(p.shape)} but Aggregate(implementation='SPARSE') needs "
            f"arcs (batch, n_edges, {k}, 2) = ({n}, n_edges, {k}, 2)"
            f"{f' or ({n}, n_edges, 2)' if k == 1 else ''}: [..., 0] the tail (sender), "
            f"[..., 1] the head (receiver) vertex; pad with -1")
    p = p.to(device=device, dtype=torch.int64)
    tails, heads = p[..., 0], p[..., 1]                    # (n, E, K)
    valid = (heads >= 0).all(-1)                           # (n, E)
    sizes = torch.tensor(geo.agg_shape, dtype=torch.int64, device=device)
    bad_tail = valid & (tails < 0).any(-1)
    if bool(bad_tail.any()):
        b, e = (int(i) for i in bad_tail.nonzero()[0])
        raise ValueError(f"`{name}`[{b}, {e}] has a negative tail {tails[b, e].tolist()} but a "
                         f"valid head {heads[b, e].tolist()}; padding arcs need a negative head "
                         f"(e.g. [-1, -1]), and negative indices do not count from the end")
    over = valid.unsqueeze(-1) & ((tails >= sizes) | (heads >= sizes))
    if bool(over.any()):
        b, e, d = (int(i) for i in over.nonzero()[0])
        raise ValueError(f"`{name}`[{b}, {e}] = tail {tails[b, e].tolist()}, head "
                         f"{heads[b, e].tolist()} is out of range: aggregated axis {d} has "
                         f"{geo.agg_shape[d]} vertices (indices 0..{geo.agg_shape[d] - 1})")
    strides = [1] * k
    for d in range(k - 2, -1, -1):
        strides[d] = strides[d + 1] * geo.agg_shape[d + 1]
    st = torch.tensor(strides, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    t = torch.where(valid, (tails * st).sum(-1), zero)
    h = torch.where(valid, (heads * st).sum(-1), zero)
    return t, h, valid.to(dtype)


# ---- the aggregation on the last axis -------------------------------------------------------

def _aggregate_last(t: torch.Tensor, pat, bdim: int, sparse: bool) -> torch.Tensor:
    """``out[..., j] = sum_i t[..., i] A[b, i, j]`` with ``b`` the index of ``t``'s axis
    ``bdim`` (the pattern's batch). ``pat``: dense ``(b, g, g)`` or sparse ``(tails, heads,
    weights)`` of shape ``(b, E)``."""
    lead = t.ndim - 1
    if not sparse:
        shape = [1] * (lead - 1) + [pat.shape[1], pat.shape[2]]
        shape[bdim] = pat.shape[0]
        return torch.matmul(t, pat.reshape(shape))
    tails, heads, w = pat
    e = tails.shape[1]
    shape = [1] * lead + [e]
    shape[bdim] = tails.shape[0]
    full = list(t.shape[:-1]) + [e]
    idx_t = tails.reshape(shape).expand(full)
    idx_h = heads.reshape(shape).expand(full)
    msg = torch.gather(t, -1, idx_t).mul_(w.reshape(shape))
    out = torch.zeros_like(t, memory_format=torch.contiguous_format)
    return out.scatter_add_(-1, idx_h, msg)


def _to_pairs(t: torch.Tensor, batch_ndim: int, geo: _Geometry):
    """Pixel-pair layout ``(B..., *S, *S)`` -> ``(B..., r, r, g, g)`` and the inverse."""
    b = tuple(range(batch_ndim))
    s1 = tuple(batch_ndim + d for d in range(geo.ns))
    s2 = tuple(batch_ndim + geo.ns + d for d in range(geo.ns))
    perm = b + tuple(s1[d] for d in geo.rest) + tuple(s2[d] for d in geo.rest) + \
        tuple(s1[d] for d in geo.agg) + tuple(s2[d] for d in geo.agg)
    bshape = tuple(t.shape[:batch_ndim])
    u = t.permute(perm).reshape(bshape + (geo.r, geo.r, geo.g, geo.g))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    mid = bshape + geo.rest_shape + geo.rest_shape + geo.agg_shape + geo.agg_shape

    def back(v):
        return v.reshape(mid).permute(inv).contiguous()
    return u, back


def _sandwich(t: torch.Tensor, batch_ndim: int, geo: _Geometry, pat1, pat2, sparse: bool):
    """``A1^T t A2`` on the aggregated pixel pairs of ``t`` (``A1`` along batch axis 0, ``A2``
    along the last batch axis)."""
    u, back = _to_pairs(t, batch_ndim, geo)
    u = _aggregate_last(u, pat2, batch_ndim - 1, sparse)                 # t A2
    u = _aggregate_last(u.transpose(-1, -2), pat1, 0, sparse).transpose(-1, -2)  # A1^T (.)
    return back(u)


def _symmetrize_pairs(c: torch.Tensor, ns: int) -> torch.Tensor:
    """A self-covariance ``(n, *S, *S)`` made exactly symmetric in its pixel pair
    (``A^T C A`` is, up to rounding)."""
    n, p = c.shape[0], int(np.prod(c.shape[1:1 + ns], dtype=np.int64))
    m = c.reshape(n, p, p)
    return (m.transpose(1, 2).mul(0.5).add_(m, alpha=0.5)).reshape(c.shape)


def _fingerprint(p: Any):
    """Identity of a pattern block for the per-evaluation memo: the tiles of one block of
    examples slice the same rows of the same array, so they share it."""
    if isinstance(p, torch.Tensor):
        return (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
    return None  # no memo


class AggregateModule(nn.Module):
    """Finite aggregation ``y = x A`` over the aggregated axes, ``A`` read from the call-time
    ``pattern`` (``net(x, pattern=p)``)."""

    def __init__(self, layer: "Aggregate", geo: _Geometry):
        super().__init__()
        self.layer, self.geo = layer, geo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, m = unwrap(x)  # masked nodes send nothing (their features are zeroed)
        return wrap(self._forward(x), m)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = call_arg("pattern")
        if arg is None:
            raise ValueError("Aggregate needs the graph: call the network as net(x, pattern=p) "
                             "with p the per-example adjacency (see ntkit.layers.Aggregate)")
        geo, n = self.geo, x.shape[0]
        sparse = self.layer.implementation == "SPARSE"
        pat = (_sparse_pattern(arg[0], geo, n, x.dtype, x.device, "pattern") if sparse else
               _dense_pattern(self.layer, arg[0], geo, n, x.dtype, x.device, "pattern"))
        c = x.shape[1]
        perm = (0, 1) + tuple(2 + d for d in geo.rest) + tuple(2 + d for d in geo.agg)
        u = x.permute(perm).reshape(n, c, geo.r, geo.g)
        u = _aggregate_last(u, pat, 0, sparse)
        u = u.reshape((n, c) + geo.rest_shape + geo.agg_shape)
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        return u.permute(inv)

    def extra_repr(self) -> str:
        return (f"aggregate_axes={tuple(a + 2 for a in self.geo.agg)}, "
                f"implementation={self.layer.implementation!r}")


@frozen_layer
class Aggregate(Layer):
    """``Aggregate(aggregate_axis=None, batch_axis=0, channel_axis=1, to_dense=None,
    implementation='DENSE')``: message passing over a per-example graph (GNN / GNTK layer).

    Args:
      aggregate_axis: node axes of the ``(N, C, *nodes)`` inputs to aggregate over (ints or a
        tuple, ``2 .. ndim - 1`` or negative); ``None``: all of them.
      batch_axis, channel_axis: ntkit's layout is fixed, ``(N, C, *nodes)``: only ``0`` and
        ``1`` are accepted (neural-tangents' defaults ``0`` / ``-1`` describe channels-last
        data; move channels with ``x.movedim(-1, 1)``).
      to_dense: with ``'DENSE'``, a function turning a batch of patterns into the dense
        ``(batch, *G, *G)`` adjacency (applied tile by tile; it must keep the batch on the
        leading axis); ``None``: the pattern is already dense.
      implementation: ``'DENSE'`` (adjacency ``(N, *G, *G)``, matrix products) or ``'SPARSE'``
        (integer arcs ``(N, n_edges, K, 2)``, gather / scatter-add).

    The pattern is a call-time argument: ``arch.kernel(x1, x2, pattern=(p1, p2))`` (``pattern=p``
    when ``x2`` is ``None``), ``net(x, pattern=p)``; it is required (neural-tangents treats a
    missing pattern as the identity graph; pass ``torch.eye(V).expand(N, V, V)`` for that).
    See :mod:`ntkit.layers.graph` for the formats and the kernel map.
    """
    rf_reads_call_args = True   # the rf map aggregates feature columns with the chunk's pattern
    aggregate_axis: Union[None, int, Tuple[int, ...]] = None
    batch_axis: int = 0
    channel_axis: int = 1
    to_dense: Optional[Callable[[Any], Any]] = None
    implementation: str = "DENSE"

    call_args = ("pattern",)
    supports_masking = True  # masked nodes: zero features in, zero covariances out (NT)

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        mod, _ = self.build(in_shape, cast(Any, None), False)   # parameter-free linear module
        return fo.ModuleLinearOp(mod, type(self).__name__), self.out_shape(in_shape)

    def __post_init__(self):
        object.__setattr__(self, "aggregate_axis", _check_axis_arg(self.aggregate_axis))
        if isinstance(self.batch_axis, bool) or self.batch_axis != 0:
            raise ValueError(f"Aggregate: `batch_axis` must be 0 (ntkit inputs are (N, C, "
                             f"*nodes)), got {self.batch_axis!r}")
        if isinstance(self.channel_axis, bool) or self.channel_axis != 1:
            raise ValueError(f"Aggregate: `channel_axis` must be 1: ntkit inputs are channels "
                             f"first, (N, C, *nodes), got {self.channel_axis!r}; for "
                             f"channels-last node features (N, V, C) (neural-tangents' "
                             f"channel_axis=-1) pass x.movedim(-1, 1)")
        impl = self.implementation
        if not isinstance(impl, str) or impl.upper() not in IMPLEMENTATIONS:
            raise ValueError(f"Aggregate: `implementation` must be 'DENSE' or 'SPARSE', got "
                             f"{impl!r}")
        object.__setattr__(self, "implementation", impl.upper())
        if self.to_dense is not None:
            if not callable(self.to_dense):
                raise TypeError(f"Aggregate: `to_dense` must be a function or None, got "
                                f"{type(self.to_dense).__name__}")
            if self.implementation == "SPARSE":
                raise ValueError("Aggregate: `to_dense` is only used by implementation='DENSE' "
                                 "(SPARSE reads integer arcs directly); drop one of them")

    def needs_full_spatial(self, above: bool) -> bool:
        return True

    def out_shape(self, in_shape: Any) -> Any:
        _Geometry(self, tuple(in_shape))
        return tuple(in_shape)

    def _patterns(self, geo: _Geometry, k: Kernel, arg):
        """Per-side patterns ``(pat1, pat2, raw1, raw2)`` for the tile (``pat2 is pat1`` for
        a symmetric tile)."""
        if arg is None:
            raise ValueError(
                "Aggregate needs the graph of every example: pass pattern=p (x2 None) or "
                "pattern=(p1, p2) to arch.kernel(...), one adjacency per example (see "
                "ntkit.layers.Aggregate)")
        raw1, raw2 = arg
        assert k.nngp is not None  # the recursion always carries the NNGP
        n1, n2 = k.nngp.shape[0], k.nngp.shape[1]
        if k.cov2 is None:
            raw2 = None
        elif raw2 is None:
            raise ValueError("Aggregate: the kernel is between two batches but only pattern1 "
                             "was given; pass pattern=(p1, p2)")
        dt, dev = k.nngp.dtype, k.nngp.device
        sparse = self.implementation == "SPARSE"

        def conv(p, n, name):
            if sparse:
                return _sparse_pattern(p, geo, n, dt, dev, name)
            return _dense_pattern(self, p, geo, n, dt, dev, name)

        pat1 = conv(raw1, n1, "pattern[0]")
        pat2 = pat1 if raw2 is None else conv(raw2, n2, "pattern[1]")
        return pat1, pat2, raw1, raw1 if raw2 is None else raw2

    def kernel_map(self, k: Kernel) -> Kernel:
        if isinstance(k, tuple):
            raise ValueError("Aggregate received several branches; merge them with FanInSum() "
                             "or FanInConcat() first")
        geo = _Geometry(self, tuple(k.shape1))
        if k.diagonal_spatial:
            raise ValueError("Aggregate needs pixel-pair covariances but received the "
                             "per-node (diagonal) layout; evaluate the architecture with "
                             "arch.kernel(), which chooses the layout from the layers")
        pat1, pat2, raw1, raw2 = self._patterns(geo, k, call_arg("pattern"))
        sparse = self.implementation == "SPARSE"

        def cross(t):
            return None if t is None else _sandwich(t, 2, geo, pat1, pat2, sparse)

        def self_map(pat):
            def fn(c):
                return _symmetrize_pairs(_sandwich(c, 1, geo, pat, pat, sparse), geo.ns)
            return fn

        def key(raw):
            fp = _fingerprint(raw)
            return None if fp is None else ("aggregate", self, tuple(k.shape1), fp)

        nngp = cross(k.nngp)
        cov1 = memo_self(key(raw1), k.cov1, self_map(pat1))
        cov2 = None if k.cov2 is None else memo_self(key(raw2), k.cov2, self_map(pat2))
        if k.cov2 is None:  # exact batch diagonal: the same map of the same numbers
            set_batch_diag(nngp, cov1)
        return k.replace(nngp=nngp, ntk=cross(k.ntk), cov1=cov1, cov2=cov2)

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        geo = _Geometry(self, tuple(in_shape))
        return AggregateModule(self, geo), tuple(in_shape)
