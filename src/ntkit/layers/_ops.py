"""Layout-generic helpers for kernel maps (FC, diagonal-spatial and full-spatial layouts)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional, Tuple

import torch

from ..kernel import Kernel
from . import _fused

Tensor = torch.Tensor


def input_kernel(x1: Tensor, x2: Optional[Tensor], want_ntk: bool, full_spatial: bool,
                 cov1: Optional[Tensor] = None, cov2: Optional[Tensor] = None) -> Kernel:
    """Kernel of the raw inputs: ``nngp = <x1, x2> / C`` (mean over the channel axis 1).

    FC ``(n, d)``: ``(n1, n2)``; spatial ``(n, C, *S)``: ``(n1, n2, *S)`` (diagonal) or
    ``(n1, n2, *S, *S)`` (full). The NTK of the inputs is zero (``ntk=None``).
    ``cov1`` / ``cov2``: self-covariances computed earlier by this function (the tiled evaluator
    passes the same tensor objects to every tile of a block row, so :func:`memo_self` can reuse
    the layers' self-covariance maps across tiles).
    """
    given1, given2 = cov1, cov2
    c = x1.shape[1]
    shape = tuple(x1.shape[1:])
    if x1.ndim == 2:
        nngp = (x1 @ (x1 if x2 is None else x2).T) / c
        cov1 = x1.pow(2).sum(1) / c if given1 is None else given1
        cov2 = None if x2 is None or given2 is not None else x2.pow(2).sum(1) / c
        diag = True
    else:
        a = x1.flatten(2)                      # (n1, C, P)
        b = a if x2 is None else x2.flatten(2)
        sp = shape[1:]
        if full_spatial:
            nngp = torch.einsum("icp,jcq->ijpq", a, b) / c
            nngp = nngp.reshape(nngp.shape[:2] + sp + sp)
            cov1 = given1 if given1 is not None else (
                torch.einsum("icp,icq->ipq", a, a).reshape((a.shape[0],) + sp + sp) / c)
            cov2 = None if x2 is None or given2 is not None else (
                torch.einsum("icp,icq->ipq", b, b).reshape((b.shape[0],) + sp + sp) / c)
        else:
            nngp = torch.einsum("icp,jcp->ijp", a, b).reshape(a.shape[:1] + b.shape[:1] + sp) / c
            cov1 = given1 if given1 is not None else (
                a.pow(2).sum(1).reshape((a.shape[0],) + sp) / c)
            cov2 = None if x2 is None or given2 is not None else (
                b.pow(2).sum(1).reshape((b.shape[0],) + sp) / c)
        diag = not full_spatial
    if given1 is not None:
        cov1 = given1
    if given2 is not None and x2 is not None:
        cov2 = given2
    k = Kernel(nngp=nngp, ntk=None, cov1=cov1, cov2=cov2, shape1=shape,
               shape2=shape if x2 is None else tuple(x2.shape[1:]), want_ntk=want_ntk,
               is_gaussian=False, diagonal_spatial=diag)
    if x2 is None:
        set_batch_diag(k.nngp, cov1)
    return k


def variances(cov: Tensor, k: Kernel) -> Tensor:
    """Per-example variances ``(n,)`` or ``(n, *S)`` from a self-covariance in ``k``'s layout."""
    ns = k.n_spatial
    if ns == 0 or k.diagonal_spatial:
        return cov
    n = cov.shape[0]
    sp = cov.shape[1:1 + ns]
    p = 1
    for s in sp:
        p *= s
    return cov.reshape(n, p, p).diagonal(dim1=1, dim2=2).reshape((n,) + tuple(sp))


def outer_vars(k: Kernel) -> Tuple[Tensor, Tensor]:
    """Variances of x1 and x2 shaped to broadcast against ``k.nngp``."""
    v1 = variances(k.cov1, k)
    v2 = v1 if k.cov2 is None else variances(k.cov2, k)
    ns = k.n_spatial
    if ns == 0 or k.diagonal_spatial:
        return v1.unsqueeze(1), v2.unsqueeze(0)
    one = (1,) * ns
    v1 = v1.reshape(v1.shape[:1] + (1,) + v1.shape[1:] + one)
    v2 = v2.reshape((1,) + v2.shape[:1] + one + v2.shape[1:])
    return v1, v2


def self_outer_vars(cov: Tensor, k: Kernel) -> Tuple[Tensor, Tensor]:
    """For full-spatial self-covariances ``(n, *S, *S)``: variances broadcast as (p, q) pairs."""
    v = variances(cov, k)
    ns = k.n_spatial
    one = (1,) * ns
    return v.reshape(v.shape + one), v.reshape(v.shape[:1] + one + v.shape[1:])


def set_batch_diag(t: Tensor, values: Tensor) -> None:
    """In place: ``t[i, i, ...] = values[i, ...]`` for a square-in-batch tensor ``t``."""
    t.diagonal(dim1=0, dim2=1).copy_(values.movedim(0, -1))


def batch_diag(t: Tensor) -> Tensor:
    """``t[i, i, ...]`` as an ``(n, ...)`` tensor."""
    return t.diagonal(dim1=0, dim2=1).movedim(-1, 0)


CrossFn = Callable[[Tensor, Tensor, Tensor, bool], Tuple[Tensor, Optional[Tensor]]]
SelfFn = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]


def apply_elementwise(k: Kernel, cross: CrossFn, self_fn: SelfFn,
                      fused: Optional[Tuple[float, float]] = None) -> Kernel:
    """Push ``k`` through an activation given its dual maps.

    ``cross(c12, v1, v2, need_dot) -> (E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)`` for
    ``(u, v) ~ N(0, [[v1, c12], [c12, v2]])`` (broadcasting), and
    ``self_fn(v) -> (E[phi(u)^2], E[phi'(u)^2])`` for ``u ~ N(0, v)``, used for exact diagonals:
    the batch diagonal of a symmetric kernel and, in the full pixel-pair layout, the pixel
    diagonal of every self-covariance (correlation exactly 1, where the two-point map would lose
    half the digits to ``sqrt(v1 v2 - c^2)``). Self-covariance maps go through
    :func:`memo_self`, so tiles sharing a block of examples compute them once.
    ``fused = (f, h)``: the map is the arc-cosine one ``nngp' = f s + (h - f theta) c`` and runs
    as one fused pass when numba is available (:mod:`ntkit.layers._fused`).
    """
    if not k.is_gaussian:
        raise ValueError("an activation needs Gaussian pre-activations: put a Dense/Conv layer "
                         "(or LayerNorm after one) before it")
    need_dot = k.ntk is not None
    full = k.n_spatial > 0 and not k.diagonal_spatial
    if fused is not None and _fused.usable(k.nngp, k.ntk, k.cov1, k.cov2):
        f, h = fused  # one fused pass (numba) for the arc-cosine family, any layout
        v1 = variances(k.cov1, k)
        v2 = v1 if k.cov2 is None else variances(k.cov2, k)
        nngp, ntk = _fused.relu(k.nngp, v1, v2, f, h, k.ntk, False, full)

        def pair_map(cov):  # full-layout self-covariance (n, *S, *S) -> (map, dot)
            var = variances(cov, k)
            return _fused.relu(cov, var, var, f, h, None, True, True, self_pairs=True)
    else:
        v1, v2 = outer_vars(k)
        # FC tiles are already cache-sized by FC_TILE_CAP (chunking them measured 1.3x slower
        # in bench_fc_kernel.py); spatial tiles are chunked.
        nngp, dot, ntk = chunked_cross(cross, k.nngp, v1, v2, need_dot, k.ntk,
                                       chunk=k.n_spatial > 0)

        def pair_map(cov):
            a, b = self_outer_vars(cov, k)
            out, d, _ = chunked_cross(cross, cov, a, b, True)
            return out.contiguous(), None if d is None else d.contiguous()

    def self_map(cov):
        if not full:
            return self_fn(cov)
        out, d = pair_map(cov)
        e, ed = self_fn(variances(cov, k))
        _set_pixel_diag(out, e, k.n_spatial)
        if d is not None:
            _set_pixel_diag(d, ed, k.n_spatial)
        return out, d

    try:
        key = ("act", cross, self_fn, k.n_spatial, k.diagonal_spatial, fused is not None)
        hash(key)
    except TypeError:
        key = None
    cov1, dot1 = memo_self(key, k.cov1, self_map)
    cov2 = None if k.cov2 is None else memo_self(key, k.cov2, self_map)[0]
    if k.cov2 is None:  # exact batch diagonal
        set_batch_diag(nngp, cov1)
        if ntk is not None and dot1 is not None and dot1.shape == batch_diag(ntk).shape:
            set_batch_diag(ntk, batch_diag(k.ntk) * dot1)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)


# Elementwise dual maps run chunk by chunk so their ~10 temporaries stay in cache: bytes of one
# chunk of one array. A pass over L2-resident data is ~3x faster than one streaming from L3/DRAM
# on the 2-core Xeon we measure on (bench/bench_conv_kernel.py); below 2 chunks, one call.
CHUNK_BYTES = 1 << 20


def chunked_cross(cross: CrossFn, c: Tensor, v1: Tensor, v2: Tensor, need_dot: bool,
                  ntk: Optional[Tensor] = None, chunk: bool = True):
    """``cross`` over ``c`` in cache-sized chunks (slices of the leading axes, with the matching
    slices of the broadcast variances ``v1``/``v2``).

    Returns ``(nngp', dot, ntk')``: with ``ntk`` given, ``ntk' = ntk * dot`` is formed per chunk
    and ``dot`` is ``None``; otherwise ``dot`` (or ``None`` if not ``need_dot``) and ``ntk'`` is
    ``None``. Outputs are new tensors (the inputs are never written).
    """
    numel = c.numel()
    step = max(1, CHUNK_BYTES // c.element_size())
    if not chunk or numel < 2 * step or c.ndim == 0:
        out, d = cross(c, v1, v2, need_dot)
        if out.data_ptr() == c.data_ptr():
            out = out.clone()
        if ntk is not None and need_dot:
            return out, None, ntk * d
        return out, d, None
    shape = c.shape
    out = torch.empty_like(c, memory_format=torch.contiguous_format)
    nt_out = None if ntk is None else torch.empty_like(out)
    d_out = torch.empty_like(out) if (need_dot and ntk is None) else None
    for idx in _chunk_index(shape, step):
        vi1 = v1[_bcast_index(idx, v1.shape, c.ndim)]
        vi2 = v2[_bcast_index(idx, v2.shape, c.ndim)]
        o, d = cross(c[idx], vi1, vi2, need_dot)
        out[idx] = o
        if nt_out is not None and d is not None:
            torch.mul(ntk[idx], d, out=nt_out[idx])
        elif d_out is not None:
            d_out[idx] = d
    return out, d_out, nt_out


def _chunk_index(shape, step: int):
    """Index tuples (slices on leading axes) partitioning ``shape`` into chunks of about
    ``step`` elements."""
    inner = 1
    a = len(shape)
    while a > 0 and inner * shape[a - 1] <= step:
        a -= 1
        inner *= shape[a]
    if a == 0:
        yield (slice(None),)
        return
    # axis a - 1 is cut in pieces of `per` rows; axes before it are walked one by one
    ax = a - 1
    per = max(1, step // inner)
    outer = shape[:ax]

    def rec(prefix, d):
        if d == ax:
            for lo in range(0, shape[ax], per):
                yield prefix + (slice(lo, min(lo + per, shape[ax])),)
            return
        for i in range(shape[d]):
            yield from rec(prefix + (slice(i, i + 1),), d + 1)

    yield from rec((), 0)


def _bcast_index(idx, vshape, ndim: int):
    """The slice of a broadcast operand matching chunk ``idx`` of the full array."""
    off = ndim - len(vshape)
    out = []
    for d, sl in enumerate(idx):
        if d < off:
            continue
        out.append(slice(None) if vshape[d - off] == 1 else sl)
    return tuple(out)


def _set_pixel_diag(t: Tensor, values: Tensor, ns: int) -> None:
    """In place: ``t[i, p, p] = values[i, p]`` for a full-layout self-covariance ``(n, *S, *S)``."""
    n = t.shape[0]
    p = values[0].numel() if values.ndim > 1 else 1
    t.view(n, p, p).diagonal(dim1=1, dim2=2).copy_(values.reshape(n, p))


# ---- per-evaluation memo of self-covariance maps ------------------------------------------

_MEMO: "contextvars.ContextVar[Optional[SelfMemo]]" = contextvars.ContextVar(
    "ntkit_self_memo", default=None)


class SelfMemo:
    """Cache of ``layer map(self-covariance)`` keyed by ``(layer key, id(input tensor))``.

    Why: tile ``(I, J)`` needs the self-covariances of blocks ``I`` and ``J`` at every layer;
    without the memo each tile recomputes them (for 4 x 4 pixel-pair tiles, 50% extra work).
    Entries hold their input tensor, so ids stay valid; the cache stops growing at
    ``max_bytes`` (later entries are recomputed, which is always correct). Layers must not
    mutate the self-covariances they receive (none does).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._d = {}
        self._held = set()  # ids of tensors the memo keeps alive

    def lookup(self, key, cov: Tensor, fn, keep_input: bool = True):
        """``fn(cov)`` from the cache, or computed and cached while it fits.

        ``keep_input=False`` keys on ``key`` alone: for roots whose input is a fresh view (the
        input blocks). Otherwise an entry is stored only when its input is itself held by the
        memo (a root or a stored output), so entries never pin uncounted tensors.
        """
        k = key if not keep_input else (key, id(cov))
        try:
            hit = self._d.get(k)
        except TypeError:  # a layer with unhashable fields: no memo
            return fn(cov)
        if hit is not None and (not keep_input or hit[0] is cov):
            self.hits += 1
            return hit[1]
        self.misses += 1
        out = fn(cov)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t)]
        size = sum(t.numel() * t.element_size() for t in outs)
        if (not keep_input or id(cov) in self._held) and self.bytes + size <= self.max_bytes:
            self._d[k] = (cov if keep_input else None, out)
            self.bytes += size
            self._held.update(id(t) for t in outs)
        return out


@contextlib.contextmanager
def self_memo(max_bytes: int):
    """Activate a :class:`SelfMemo` of at most ``max_bytes`` for the enclosed evaluation."""
    memo = SelfMemo(max_bytes)
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)


def memo_self(key, cov: Optional[Tensor], fn):
    """``fn(cov)``, reused from the active memo when the same tensor was mapped by the same
    layer (``key``: hashable layer identity, or ``None`` to skip the memo)."""
    if cov is None:
        return None
    memo = _MEMO.get()
    if memo is None or key is None:
        return fn(cov)
    return memo.lookup(key, cov, fn)


def safe_sqrt(x: Tensor) -> Tensor:
    return x.clamp_min(0).sqrt()
