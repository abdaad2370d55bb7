"""Layout-generic helpers for kernel maps (FC, diagonal-spatial and full-spatial layouts)."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch

from .._validation import extremes
from ..kernel import GramFactors, Kernel
from . import _fused
from ._numeric import SNAP_ULPS as SNAP_ULPS
from ._numeric import inv_sqrt as inv_sqrt

Tensor = torch.Tensor


def _pow2_scale(*xs: Optional[Tensor], terms: int = 1) -> float:
    """A power of two near ``max |x|`` (1.0 for all-zero inputs): dividing by it is exact, so
    Gram matrices of the scaled inputs are bitwise those of the inputs times ``1/s^2`` wherever
    the latter do not over/underflow, and are representable wherever the result is.

    Scaling down only guards against overflow (smaller factors underflow sooner), so 1.0 is
    returned instead of an ``s > 1`` when no sum of ``terms`` products ``<= max|x|^2`` can
    overflow: the same bits without the copies."""
    m = 0.0
    for x in xs:
        if x is not None and x.numel():
            lo, hi = extremes(x)   # one pass (none after the input check), no |x| temporary
            m = max(m, -lo, hi)
    if not (m > 0) or not math.isfinite(m):
        return 1.0
    s = math.ldexp(1.0, math.frexp(m)[1])
    if s > 1.0 and m * m * max(terms, 1) <= torch.finfo(xs[0].dtype).max / 4:  # type: ignore[union-attr]
        return 1.0
    return s


_HASH_W: Dict[Any, Tensor] = {}


def row_keys(x: Tensor) -> Tensor:
    """An ``int64`` key per row, equal for bitwise-equal rows: the row's bit patterns times
    fixed odd weights, summed with wrap-around (integer arithmetic is exact and associative,
    so the key does not depend on the row's position). ``O(n d)``; distinct rows collide with
    probability ~2^-64, and callers confirm equality before relying on it."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous()   # (also 0 rows)
    d = flat.shape[1]
    w = _HASH_W.get((d, flat.device))
    if w is None:  # drawn on the CPU (the same weights everywhere), kept per device
        g = torch.Generator().manual_seed(0x5EED)
        w = torch.randint(-2**62, 2**62, (d,), generator=g, dtype=torch.int64,
                          device="cpu") | 1
        w = _HASH_W.setdefault((d, flat.device), w.to(flat.device))
    if flat.shape[0] and d and _fused.usable(flat):  # one pass, no int64 copy (numba)
        return _fused.row_keys(flat, w)
    bits = flat.view(torch.int64) if flat.dtype == torch.float64 else \
        flat.view(torch.int32).to(torch.int64)
    return (bits * w).sum(1)


def _candidates(keys: Tensor) -> Optional[Tensor]:
    """Boolean mask of entries whose key occurs more than once, or ``None`` if none does."""
    if keys.numel() < 2:
        return None
    srt, perm = torch.sort(keys)
    same = srt[1:] == srt[:-1]
    if not bool(same.any()):
        return None
    mask = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    mask[perm[1:][same]] = True
    mask[perm[:-1][same]] = True
    return mask


def first_occurrence(x: Tensor) -> Optional[Tensor]:
    """``rep[i]`` = the first index of a row bitwise equal to ``x[i]``, or ``None`` when all
    rows differ (the common case costs one pass over ``x`` and a sort of ``n`` keys)."""
    n = x.shape[0]
    cand = _candidates(row_keys(x)) if n > 1 else None
    if cand is None:
        return None
    idx = cand.nonzero().flatten()
    _, inv = torch.unique(x[idx].reshape(idx.numel(), -1), dim=0, return_inverse=True)
    groups = int(inv.max()) + 1
    if groups == idx.numel():
        return None
    first = torch.full((groups,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, idx, reduce="amin")
    rep = torch.arange(n, device=x.device)
    rep[idx] = first[inv]
    return rep


def has_duplicate_rows(x1: Tensor, x2: Optional[Tensor] = None) -> bool:
    """Whether two rows of ``x1`` (and ``x2``) are equal, as :func:`first_occurrence` decides,
    without concatenating the inputs: one pass over each for the keys, and only the rows whose
    keys collide are compared."""
    keys = row_keys(x1) if x2 is None else torch.cat([row_keys(x1), row_keys(x2)])
    cand = _candidates(keys)
    if cand is None:
        return False
    idx = cand.nonzero().flatten()
    n1 = x1.shape[0]
    rows = x1[idx[idx < n1]]
    if x2 is not None:
        rows = torch.cat([rows, x2[idx[idx >= n1] - n1]])
    flat = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    return int(torch.unique(flat, dim=0).shape[0]) < flat.shape[0]


def duplicate_pairs(x1: Tensor, x2: Optional[Tensor]):
    """Index pairs ``(i, j)`` with ``x1[i]`` and ``x2[j]`` bitwise equal (``i != j`` when ``x2``
    is ``None``), or ``None`` if there are none."""
    n1 = x1.shape[0]
    both = x1 if x2 is None else torch.cat([x1, x2])
    rep = first_occurrence(both)
    if rep is None:
        return None
    r1, r2 = rep[:n1], (rep if x2 is None else rep[n1:])
    eq = r1[:, None] == r2[None, :]
    if x2 is None:
        eq.fill_diagonal_(False)
    ii, jj = eq.nonzero(as_tuple=True)
    return (ii, jj) if ii.numel() else None


def input_kernel(x1: Tensor, x2: Optional[Tensor], want_ntk: bool, full_spatial: bool,
                 cov1: Optional[Tensor] = None, cov2: Optional[Tensor] = None,
                 duplicates: bool = True) -> Kernel:
    """Kernel of the raw inputs: ``nngp = <x1, x2> / C`` (mean over the channel axis 1).

    FC ``(n, d)``: ``(n1, n2)``; spatial ``(n, C, *S)``: ``(n1, n2, *S)`` (diagonal) or
    ``(n1, n2, *S, *S)`` (full). The NTK of the inputs is zero (``ntk=None``).
    ``cov1`` / ``cov2``: self-covariances computed earlier by this function (the tiled evaluator
    passes the same tensor objects to every tile of a block row, so :func:`memo_self` can reuse
    the layers' self-covariance maps across tiles).

    Numerics: where a sum of ``C`` products could overflow, the inputs are divided by a power of
    two near their largest entry before the products (exact; :func:`_pow2_scale`), so the Gram
    matrix neither overflows nor underflows where its entries are representable (``|x| ~ 1e20``
    in float32); small inputs are scaled up the same way. Pairs of bitwise-identical examples get
    ``nngp = cov`` exactly (a matrix product and a sum of squares round differently, and deep
    chaotic networks amplify any such difference: identical inputs must stay identical).
    ``duplicates=False``: the caller knows that no row of ``x1`` equals a row of ``x2`` (or
    another row of ``x1``) and the per-call search is skipped (the tiled evaluator checks all
    inputs once instead of once per tile).
    """
    given1, given2 = cov1, cov2
    c = x1.shape[1]
    shape = tuple(x1.shape[1:])
    s = _pow2_scale(x1, x2, terms=c)
    y1 = x1 / s if s != 1.0 else x1
    y2 = None if x2 is None else (x2 / s if s != 1.0 else x2)

    # (G / C) * s * s, in place on the fresh product (no second array per tile). The scaling by
    # s is exact; for s > 1 one multiplication by s^2 gives the same bits as two by s (no
    # product can underflow and t s^2 overflows exactly when (t s) s does), for s < 1 two keep
    # the rounding of results in the subnormal range unchanged.
    one_step = s > 1.0 and s * s <= torch.finfo(x1.dtype).max

    def fin(t):
        # (einsum hands back permuted views: the division writes them contiguously, else the
        # next layer's map copies them first)
        t = t.div_(c) if t.is_contiguous() else torch.div(
            t, c, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))
        if s == 1.0:
            return t
        return t.mul_(s * s) if one_step else t.mul_(s).mul_(s)

    if x1.ndim == 2:
        yb = y1 if y2 is None else y2
        if c & (c - 1) == 0 and s == 1.0 and y1.device.type == "cpu":
            # 1/C is exact for a power of two: the GEMM scales as it stores (the same bits as
            # dividing afterwards, one pass over the (n1, n2) tile fewer)
            nngp = torch.addmm(torch.empty((), dtype=y1.dtype), y1, yb.T, beta=0.0,
                               alpha=1.0 / c)
        else:
            nngp = fin(y1 @ yb.T)
        cov1 = fin(y1.pow(2).sum(1)) if given1 is None else given1
        cov2 = None if y2 is None or given2 is not None else fin(y2.pow(2).sum(1))
        diag = True
    else:
        a = y1.flatten(2)                      # (n1, C, P)
        b = a if y2 is None else y2.flatten(2)
        sp = shape[1:]
        if full_spatial:
            nngp = fin(torch.einsum("icp,jcq->ijpq", a, b))
            nngp = nngp.reshape(nngp.shape[:2] + sp + sp)
            cov1 = given1 if given1 is not None else fin(
                torch.einsum("icp,icq->ipq", a, a).reshape((a.shape[0],) + sp + sp))
            cov2 = None if x2 is None or given2 is not None else fin(
                torch.einsum("icp,icq->ipq", b, b).reshape((b.shape[0],) + sp + sp))
        else:
            nngp = fin(torch.einsum("icp,jcp->ijp", a, b).reshape(a.shape[:1] + b.shape[:1] + sp))
            cov1 = given1 if given1 is not None else fin(
                a.pow(2).sum(1).reshape((a.shape[0],) + sp))
            cov2 = None if x2 is None or given2 is not None else fin(
                b.pow(2).sum(1).reshape((b.shape[0],) + sp))
        diag = not full_spatial
    if given1 is not None:
        cov1 = given1
    if given2 is not None and x2 is not None:
        cov2 = given2
    dup = duplicate_pairs(x1, x2) if duplicates else None
    if dup is not None:
        ii, jj = dup
        nngp[ii, jj] = cov1[ii]
        if cov2 is not None and given2 is None:  # the same self-covariance on both sides
            cov2 = cov2.clone()
            cov2[jj] = cov1[ii]
    if x2 is None:
        set_batch_diag(nngp, cov1)
    gram = None
    if full_spatial and x1.ndim > 2 and dup is None:
        # nngp = (s^2 / C) <y1_p, y2_q>: layers that can work on the features (attention right
        # after Dense layers) use them instead of the pixel-pair array (views: no cost here)
        gram = GramFactors.make(y1.flatten(2), None if y2 is None else y2.flatten(2),
                                s / math.sqrt(c), (1.0, 0.0), None, nngp, None)
    return Kernel(nngp=nngp, ntk=None, cov1=cov1, cov2=cov2, shape1=shape,
                  shape2=shape if x2 is None else tuple(x2.shape[1:]), want_ntk=want_ntk,
                  is_gaussian=False, diagonal_spatial=diag, gram=gram)


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
    assert k.cov1 is not None  # the recursion always carries the x1 self-covariance
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


DualFn = Callable[[Tensor, Tensor, Tensor, bool], Tuple[Tensor, Optional[Tensor]]]
SelfFn = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]

# Correlations within SNAP_ULPS units of roundoff of +-1 are taken as exactly +-1 (see
# :func:`correlation`).


def correlation(c: Tensor, v1: Tensor, v2: Tensor, skip=None) -> Tensor:
    """The correlation ``rho = c / (sqrt(v1) sqrt(v2))`` (``0`` where a variance is 0), clipped
    into ``[-1, 1]`` and snapped to exactly +-1 within ``SNAP_ULPS`` units of roundoff.

    Why: the dual maps are functions of the correlation and of the two variances separately;
    computing them from normalized quantities (``rho = (c / sqrt(v1)) / sqrt(v2)``, never
    ``v1 v2``, which over/underflows far inside the representable range) keeps them right at
    any scale where the result is representable, and clipping keeps every output a valid
    covariance (Cauchy-Schwarz) whatever the rounding of ``c``. The snap: an example paired
    with an identical one has correlation 1, but rounding (a matrix product vs a sum of squares,
    vectorized loops) puts it a few ulp off, and a chaotic network's correlation map has a slope
    above 1 at 1, so that deviation grows exponentially with depth (identical inputs of a
    depth-30 Erf net with ``W_std=5`` ended up decorrelated). A correlation within a few ulp of
    1 is indistinguishable from 1 at this precision, so it is set to 1 and stays there.
    ``skip``: ``(i, j)`` index tensors of entries to exclude (set to 0; the caller overwrites
    their outputs, e.g. the batch diagonal of a symmetric tile) so that the common case takes
    no masked pass.
    """
    rho = (c * inv_sqrt(v1)).mul_(inv_sqrt(v2)).clamp_(-1.0, 1.0)
    if skip is not None:
        rho[skip] = 0.0
    if rho.numel() == 0:
        return rho
    tol = SNAP_ULPS * torch.finfo(c.dtype).eps
    if rho.device.type == "cpu":  # skip the pass when nothing is near +-1; on an accelerator
        lo, hi = torch.aminmax(rho)  # the pass is cheaper than this host synchronization
        if float(hi) < 1 - tol and float(lo) > tol - 1:
            return rho
    return torch.where(rho.abs() >= 1 - tol, rho.sign(), rho)


def normalized_cross(dual: DualFn, c: Tensor, v1: Tensor, v2: Tensor, need_dot: bool,
                     skip=None):
    """``dual(rho, v1, v2, need_dot)`` with ``rho = correlation(c, v1, v2)``."""
    return dual(correlation(c, v1, v2, skip), v1, v2, need_dot)


def act_memo_key(dual: DualFn, self_fn: SelfFn, k: Kernel, use_fused: bool):
    """The tile memo's key for an activation's self-covariance map (``None``: unhashable, no
    memo); shared by :func:`apply_elementwise` and the fused FC runs
    (:mod:`ntkit.layers._fc_chain`), so either path reuses the other's maps."""
    key = ("act", dual, self_fn, k.n_spatial, k.diagonal_spatial, use_fused)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def apply_elementwise(k: Kernel, dual: DualFn, self_fn: SelfFn,
                      fused: Optional[Callable[..., Tuple[Tensor, Optional[Tensor]]]] = None
                      ) -> Kernel:
    """Push ``k`` through an activation given its dual maps.

    ``dual(rho, v1, v2, need_dot) -> (E[phi(u) phi(v)], E[phi'(u) phi'(v)] or None)`` for
    ``(u, v) ~ N(0, [[v1, c], [c, v2]])`` given the clipped correlation ``rho`` (broadcasting
    against the variances; see :func:`correlation`), and
    ``self_fn(v) -> (E[phi(u)^2], E[phi'(u)^2])`` for ``u ~ N(0, v)``, used for exact diagonals:
    the batch diagonal of a symmetric kernel and, in the full pixel-pair layout, the pixel
    diagonal of every self-covariance (correlation exactly 1, where the two-point map would lose
    half the digits to the angle). Self-covariance maps go through :func:`memo_self`, so tiles
    sharing a block of examples compute them once.
    ``fused``: the same map as one fused pass (:mod:`ntkit.layers._fused`, numba), called as
    ``fused(c, v1, v2, ntk, need_dot, full, self_pairs)`` like :func:`ntkit.layers._fused.relu`
    and used when :func:`ntkit.layers._fused.usable` holds (see ``Activation.fused_map``).
    """
    if not k.is_gaussian:
        raise ValueError("an activation needs Gaussian pre-activations: put a Dense/Conv layer "
                         "(or LayerNorm after one) before it")
    # the recursion always carries the NNGP and the x1 self-covariance
    assert k.nngp is not None and k.cov1 is not None
    need_dot = k.ntk is not None
    full = k.n_spatial > 0 and not k.diagonal_spatial
    use_fused = fused is not None and _fused.usable(k.nngp, k.ntk, k.cov1, k.cov2)
    if use_fused:
        assert fused is not None  # use_fused implies it
        pair = fused
        v1 = variances(k.cov1, k)
        v2 = v1 if k.cov2 is None else variances(k.cov2, k)
        nngp, ntk = pair(k.nngp, v1, v2, k.ntk, False, full, False)

        def pair_map(cov):  # full-layout self-covariance (n, *S, *S) -> (map, dot)
            var = variances(cov, k)
            return pair(cov, var, var, None, True, True, True)
    else:
        v1, v2 = outer_vars(k)
        # FC tiles are already cache-sized by FC_TILE_CAP (chunking them measured 1.3x slower
        # in bench_fc_kernel.py); spatial tiles are chunked. The batch diagonal of a symmetric
        # tile is skipped (overwritten below with the exact one-point maps).
        nngp, dot, ntk = chunked_cross(dual, k.nngp, v1, v2, need_dot, k.ntk,
                                       chunk=k.n_spatial > 0, symmetric=k.cov2 is None)

        def pair_map(cov):
            a, b = self_outer_vars(cov, k)
            out, d, _ = chunked_cross(dual, cov, a, b, True)
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

    key = act_memo_key(dual, self_fn, k, use_fused)
    cov1, dot1 = memo_self(key, k.cov1, self_map)
    cov2 = None if k.cov2 is None else memo_self(key, k.cov2, self_map)[0]
    if k.cov2 is None:  # exact batch diagonal
        set_batch_diag(nngp, cov1)
        if ntk is not None and k.ntk is not None and dot1 is not None \
                and dot1.shape == batch_diag(ntk).shape:  # (ntk is None when k.ntk is)
            set_batch_diag(ntk, batch_diag(k.ntk) * dot1)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)


# Elementwise dual maps run chunk by chunk so their ~10 temporaries stay in cache: bytes of one
# chunk of one array. A pass over L2-resident data is ~3x faster than one streaming from L3/DRAM
# on the 2-core Xeon we measure on (bench/bench_conv_kernel.py); below 2 chunks, one call.
CHUNK_BYTES = 1 << 20


def _diag_in_chunk(idx, shape, device=None):
    """Local ``(i, j)`` indices (on ``device``) of the batch-diagonal entries ``(i, i, ...)``
    inside the chunk ``c[idx]`` of a square-in-batch array, or ``None`` if it holds none."""
    def rng(d):
        sl = idx[d] if d < len(idx) else slice(None)
        start, stop, _ = sl.indices(shape[d])
        return start, stop
    i0, i1 = rng(0)
    j0, j1 = rng(1)
    lo, hi = max(i0, j0), min(i1, j1)
    if hi <= lo:
        return None
    d = torch.arange(lo, hi, device=device)
    return d - i0, d - j0


def chunked_cross(dual: DualFn, c: Tensor, v1: Tensor, v2: Tensor, need_dot: bool,
                  ntk: Optional[Tensor] = None, chunk: bool = True, symmetric: bool = False):
    """:func:`normalized_cross` over ``c`` in cache-sized chunks (slices of the leading axes,
    with the matching slices of the broadcast variances ``v1``/``v2``).

    Returns ``(nngp', dot, ntk')``: with ``ntk`` given, ``ntk' = ntk * dot`` is formed per chunk
    and ``dot`` is ``None``; otherwise ``dot`` (or ``None`` if not ``need_dot``) and ``ntk'`` is
    ``None``. Outputs are new tensors (the inputs are never written). ``symmetric``: ``c`` is
    square in its two batch axes and its batch diagonal will be overwritten by the caller, so
    it is left out of the correlation snapping (see :func:`correlation`).
    """
    numel = c.numel()
    step = max(1, CHUNK_BYTES // c.element_size())
    chunk = chunk and c.device.type == "cpu"  # cache-sized chunks help CPUs only
    if not chunk or numel < 2 * step or c.ndim == 0:
        skip = _diag_in_chunk((slice(None),), c.shape, c.device) if symmetric else None
        out, d = normalized_cross(dual, c, v1, v2, need_dot, skip)
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
        skip = _diag_in_chunk(idx, shape, c.device) if symmetric else None
        o, d = normalized_cross(dual, c[idx], vi1, vi2, need_dot, skip)
        out[idx] = o
        if nt_out is not None and ntk is not None and d is not None:  # (nt_out: ntk given)
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
        self._d: Dict[Any, Any] = {}
        self._held: Set[int] = set()  # ids of tensors the memo keeps alive

    def lookup(self, key, cov: Tensor, fn, keep_input: bool = True):
        """``fn(cov)`` from the cache, or computed and cached while it fits.

        ``keep_input=False`` keys on ``key`` alone: for roots whose input is a fresh view (the
        input blocks). Otherwise an entry is stored only when its input is itself held by the
        memo (a root or a stored output), so entries never pin uncounted tensors.
        """
        ins = cov if isinstance(cov, tuple) else (cov,)   # several inputs: the fan-ins
        k = key if not keep_input else (key, tuple(id(c) for c in ins))
        try:
            hit = self._d.get(k)
        except TypeError:  # a layer with unhashable fields: no memo
            return fn(cov)
        if hit is not None and (not keep_input or all(
                a is b for a, b in zip(hit[0], ins))):
            self.hits += 1
            return hit[1]
        self.misses += 1
        out = fn(cov)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t)]
        size = sum(t.numel() * t.element_size() for t in outs)
        held = all(id(c) in self._held for c in ins)
        if (not keep_input or held) and self.bytes + size <= self.max_bytes:
            self._d[k] = (ins if keep_input else None, out)
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


def memo_self(key, cov: Any, fn):
    """``fn(cov)``, reused from the active memo when the same tensor was mapped by the same
    layer (``key``: hashable layer identity, or ``None`` to skip the memo). ``cov`` may be a
    tuple of tensors (a fan-in's branches): reused when it is the same tensors again."""
    if cov is None:
        return None
    memo = _MEMO.get()
    if memo is None or key is None:
        return fn(cov)
    return memo.lookup(key, cov, fn)


def safe_sqrt(x: Tensor) -> Tensor:
    return x.clamp_min(0).sqrt()
