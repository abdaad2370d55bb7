"""Single-pass fused CPU kernels for the hot loops of kernel maps (optional numba).

Why: in eager torch a Conv stencil costs ``2 sum_d (f_d - 1)`` passes and an arc-cosine dual
map ~10 passes (product, sqrt, atan2, scale, ...), each over the whole array; fused, each map is
one vectorized pass that reads its inputs once, computing in the storage dtype as the torch path
does. Used automatically for CPU float32/float64 tensors when numba is installed
(``pip install ntkit[fast]``) and ``NTKIT_FUSED`` is not ``0``: 1-D and 2-D stride-1 convs
with zero padding that keeps the size, on both spatial layouts (3x3: one loop for all nine
taps), and the dual maps of the ``ABRelu`` family (ReLU, leaky ReLU, Abs), ``Gabor`` and
``ExpNormalized`` on every layout, FC included (each activation's ``fused_map``, run by
``_ops.apply_elementwise``); these compute exp/sinh/cosh/atan as short polynomials, so their
loops vectorize. ``ntkit.settings(fused=False)`` (or ``NTKIT_FUSED=0``) turns them off.
Everything else keeps the torch path, which is also the reference the fused kernels are tested
against (``tests/layers/test_fused.py``, ``tests/layers/test_fused_activations.py``).

Threads: ``torch.get_num_threads()`` (one thread calls the serial kernels, so tiles computed
single-threaded in the scale executors never touch numba's thread pool). Each output row is
computed by one thread with the same code, so results do not depend on the thread count.
Fork: numba's default (GNU OpenMP) layer aborts a forked child that runs a parallel kernel after
the parent did; torch's own OpenMP pool already hangs such a child (also with
``NTKIT_FUSED=0``), so start worker processes with 'spawn'/'forkserver' (Dask does). The
fork-safe 'workqueue' layer was measured 1.7x slower end to end (many short parallel calls).
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .._settings import settings
from ._numeric import SNAP_ULPS, inv_sqrt, mark_finite, tu as _tu

Tensor = torch.Tensor

_K = None          # the kernels module, or False when numba is missing / disabled
_LOCK = threading.Lock()  # numba's workqueue layer must not be entered by two threads at once


def _kernels():
    global _K
    if _K is None:
        try:
            from . import _fused_kernels as k
            _K = k
        except Exception:  # numba missing or broken: the torch path serves
            _K = False
    return _K


def enabled() -> bool:
    """Whether the fused kernels are in use: ``ntkit.settings.fused`` if set, else numba
    importable and ``NTKIT_FUSED != '0'``. ``settings(fused=True)`` without numba raises."""
    forced = settings.fused
    if forced is None:
        return os.environ.get("NTKIT_FUSED", "1") != "0" and bool(_kernels())
    if forced and not _kernels():
        raise ImportError("ntkit.settings(fused=True) needs numba for the fused kernels "
                          "(pip install ntkit[fast]); use fused=None to fall back to torch")
    return forced


def usable(*ts: Optional[Tensor]) -> bool:
    """All given tensors on CPU, float32/float64 and one dtype, and the kernels enabled."""
    given = [t for t in ts if t is not None]
    if not given or not enabled():
        return False
    dt = given[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dt and not t.requires_grad for t in given) \
        and dt in (torch.float32, torch.float64)


def _np(t: Tensor) -> np.ndarray:
    """Flat numpy view (a copy only when ``t`` is not contiguous)."""
    return t.detach().contiguous().numpy().reshape(-1)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _call(serial, parallel, *args, acc_len: int = 0, acc_dtype=None, rows: int = 1):
    nt = min(_threads(), max(1, rows))
    if nt > 1:
        import numba
        # numba.core.config sets NUMBA_NUM_THREADS at import (through globals()), so its
        # stubs do not declare it
        nt = min(nt, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if acc_len:
        args = args + (np.zeros((nt, acc_len), dtype=acc_dtype),)
    if nt == 1:
        return serial(*args)
    import numba
    with _LOCK:
        prev = numba.get_num_threads()
        if prev != nt:
            numba.set_num_threads(nt)
        try:
            return parallel(*args)
        finally:
            if prev != nt:
                numba.set_num_threads(prev)


# Outputs of the fused activation are allocated inside a zero-margined buffer laid out as the
# 3x3 stencil wants its input (``margin(W)`` zeros, the data, ``margin(W)`` zeros, a zero
# plane, ``margin(W)`` zeros), so the next Conv reads them in place instead of copying. The tensor carries
# the buffer and its geometry as attributes (only tensors made here have them).
_PAD_ATTR = "_ntkit_padded"


def margin(w: int) -> int:
    """Zeros around a padded source: the largest 3x3 tap shift, ``2 W + 2`` (padding 0 or 2)."""
    return 2 * w + 2


def _padded_empty(shape, dtype: torch.dtype, h: int, w: int) -> Tensor:
    n = int(np.prod(shape))
    mg, npix = margin(w), h * w
    ty = np.float32 if dtype == torch.float32 else np.float64
    buf = np.empty(mg + n + mg + npix + mg, dtype=ty)
    buf[:mg] = 0
    buf[mg + n:] = 0
    out = torch.from_numpy(buf[mg:mg + n]).view(shape)
    setattr(out, _PAD_ATTR, (buf, h, w))
    return out


def _padded_source(t: Tensor, h: int, w: int, src: np.ndarray):
    """``(buffer, zero-block offset)`` for the 3x3 kernel: ``t``'s own buffer when it was made
    by :func:`_padded_empty` with this geometry and is untouched in layout, else a copy."""
    mg, npix, n = margin(w), h * w, src.shape[0]
    info = getattr(t, _PAD_ATTR, None)
    if info is not None and info[1] == h and info[2] == w and t.is_contiguous():
        buf = info[0]
        if buf.shape[0] == mg + n + mg + npix + mg and \
                t.data_ptr() == buf.ctypes.data + mg * buf.itemsize:
            return buf, mg + n + mg
    tp = np.empty(mg + n + mg + npix + mg, dtype=src.dtype)
    tp[:mg] = 0
    tp[mg:mg + n] = src
    tp[mg + n:] = 0
    return tp, mg + n + mg


_MASKS: Dict[Tuple[Any, ...], np.ndarray] = {}


def _col_masks(npix: int, w: int, lo2: int, f2: int, dtype) -> np.ndarray:
    """0/1 validity of each tap column ``k2`` at every output pixel, flat ``(f2 * npix,)``."""
    key = (npix, w, lo2, f2, np.dtype(dtype).str)
    mk = _MASKS.get(key)
    if mk is None:
        q2 = np.arange(npix) % w
        mk = np.stack([(q2 + k2 - lo2 >= 0) & (q2 + k2 - lo2 < w) for k2 in range(f2)])
        mk = _MASKS.setdefault(key, mk.astype(dtype).reshape(-1))
    return mk


def _consts(dtype, *vals):
    """A tuple of numpy scalars of ``dtype`` (numba types it as that dtype)."""
    ty = np.float32 if dtype == torch.float32 else np.float64
    return tuple(ty(v) for v in vals)


def conv_ok(filt: Sequence[int], strides: Sequence[int], pads, circular: bool) -> bool:
    """Whether the fused stencil covers this conv: 1-D/2-D, stride 1, zero padding that keeps
    the size (``lo + hi = f - 1``, e.g. 'SAME' with any filter)."""
    return (len(filt) in (1, 2) and not circular and all(s == 1 for s in strides)
            and all(lo + hi == f - 1 for f, (lo, hi) in zip(filt, pads)))


def conv(t: Tensor, batch_ndim: int, filt: Sequence[int], pads, alpha: float, base,
         full: bool) -> Tensor:
    """``base + alpha * stencil(t)`` (see :func:`conv_ok` for the cases covered), ``t`` of
    layout ``(*batch, *S, *S)`` (``full``) or ``(*batch, *S)``; same shape out."""
    k = _kernels()
    ns = len(filt)
    sp = tuple(t.shape[batch_ndim:batch_ndim + ns])
    if ns == 1:  # as 2-D with a singleton first axis
        filt, pads, sp = (1,) + tuple(filt), ((0, 0),) + tuple(pads), (1,) + sp
    (f1, f2), ((lo1, _), (lo2, _)) = filt, pads
    h, w = sp
    npix = h * w
    m = t.numel() // (npix * npix if full else npix)
    planes = m * npix if full else m
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")  # (CPU-only kernels)
    has_base = torch.is_tensor(base) and base.ndim > 0
    if has_base:
        b = _np(torch.broadcast_to(base.to(t.dtype), t.shape))
        beta = 0.0
    else:
        b = np.zeros(1, dtype=out.numpy().dtype)
        beta = 0.0 if base is None else float(base)
    al, be = _consts(t.dtype, alpha, beta)
    src = _np(t)
    o = out.numpy().reshape(-1)
    mk = _col_masks(npix, w, lo2, f2, b.dtype)
    if f1 == 3 and f2 == 3 and h >= 2:
        tp, zoff = _padded_source(t, h, w, src)
        _call(k.conv3x3_serial, k.conv3x3_parallel, tp, o, b, has_base, mk, h, w, lo1, lo2,
              al, be, bool(full), zoff, planes, rows=planes)
        return out
    _call(k.conv_serial, k.conv_parallel, src, o, b, has_base, mk,
          h, w, f1, f2, lo1, lo2, al, be, bool(full), planes, acc_len=npix, acc_dtype=b.dtype,
          rows=planes)
    return out


def relu(c: Tensor, v1: Tensor, v2: Tensor, f: float, h: float, ntk: Optional[Tensor],
         need_dot: bool, full: bool, self_pairs: bool = False):
    """The ``ABRelu`` dual map in one pass, in the normalized form of
    :func:`ntkit.layers._ops.correlation` (clipped, snapped correlation; no product of
    variances), the same arithmetic as the torch path.

    ``c``: ``(n1, n2, *S, *S)`` (``full``) or ``(n1, n2, *S)``, or with ``self_pairs`` the
    self-covariances ``(n, *S, *S)`` (``v1 = v2``). ``v1``, ``v2``: per-example pixel variances
    ``(n1, *S)``, ``(n2, *S)``. Returns ``(nngp', ntk * dot)`` when ``ntk`` is given, else
    ``(nngp', dot or None)``.
    """
    k = _kernels()
    tol = SNAP_ULPS * torch.finfo(c.dtype).eps
    consts = _consts(c.dtype, 0.0, 1.0, math.pi, math.pi / 2, f, h, tol)
    coef = _consts(c.dtype, *(k.ATAN_F32 if c.dtype == torch.float32 else k.ATAN_F64))
    s1, r1 = v1.sqrt(), inv_sqrt(v1)
    s2, r2 = (s1, r1) if v2 is v1 else (v2.sqrt(), inv_sqrt(v2))
    return _dual_pass(k.relu_serial, k.relu_parallel, c, v1, v2, (r1, r2, s1, s2),
                      (consts, coef), ntk, need_dot, full, self_pairs)


def _dual_pass(serial, parallel, c: Tensor, v1: Tensor, v2: Tensor, per_example, consts,
               ntk: Optional[Tensor], need_dot: bool, full: bool, self_pairs: bool):
    """Run a fused dual-map kernel ``kernel(C, *per_example, ia, ib, NTK, OUT, D, R, Q, mode,
    full, *consts)`` (the layout of ``_relu_row``) over ``c`` (shapes as in :func:`relu`);
    ``per_example``: tensors shaped like ``v1``/``v2`` (flattened here), ``consts``: tuples of
    the storage dtype. Returns :func:`relu`'s ``(nngp', ntk * dot | dot | None)``."""
    n1, n2 = v1.shape[0], v2.shape[0]
    arrs = tuple(_np(a) for a in per_example)
    mode = 0 if ntk is not None else (1 if need_dot else 2)
    if v1.ndim == 1:  # fully connected (n1, n2): one block of n1 rows of n2
        out = torch.empty(c.shape, dtype=c.dtype, device="cpu")  # (CPU-only kernels)
        d = torch.empty_like(out) if mode != 2 else out
        nt = _np(ntk) if ntk is not None else d.numpy().reshape(-1)
        zero = np.zeros(1, dtype=np.int64)
        _call(serial, parallel, _np(c), *arrs, zero, zero, nt, out.numpy().reshape(-1),
              d.numpy().reshape(-1), n1, n2, mode, True, *consts, rows=n1)
        return (out, None) if mode == 2 else (out, d)
    p = v1[0].numel()
    if self_pairs:
        ia = ib = np.arange(n1, dtype=np.int64)
    else:
        ia = np.repeat(np.arange(n1, dtype=np.int64), n2)
        ib = np.tile(np.arange(n2, dtype=np.int64), n1)
    rows = p if full else 1
    sp = tuple(v1.shape[1:])
    ph, pw = (sp if len(sp) == 2 else (1, sp[0])) if len(sp) in (1, 2) else (1, p)
    out = _padded_empty(c.shape, c.dtype, ph, pw)
    d = _padded_empty(c.shape, c.dtype, ph, pw) if mode != 2 else out
    nt = _np(ntk) if ntk is not None else d.numpy().reshape(-1)
    _call(serial, parallel, _np(c), *arrs, ia, ib, nt, out.numpy().reshape(-1),
          d.numpy().reshape(-1), rows, p, mode, bool(full), *consts, rows=ia.shape[0] * rows)
    if mode == 2:
        return out, None
    return out, d


def gabor_per_example(v: Tensor) -> Tuple[Tensor, ...]:
    """``(1/sqrt(v), t, u, sqrt(t), sqrt(u))`` with ``t = 2v / (1 + 2v)``, ``u = 1 / (1 + 2v)``:
    the per-example numbers of the fused Gabor map (``_gabor_one``), by ``Gabor.dual``'s torch
    code."""
    t, u = _tu(v * 2)
    return inv_sqrt(v), t, u, t.sqrt(), u.sqrt()


def _gabor_consts(dt: torch.dtype):
    k = _kernels()
    info = torch.finfo(dt)
    consts = _consts(dt, 0.0, 1.0, SNAP_ULPS * info.eps, info.tiny, 0.25, 0.5, 2.0,
                     math.exp(-0.5))
    polys = tuple(_consts(dt, *p) for p in (k.EXP_TAYLOR, k.SINH_TAYLOR, k.COSH_TAYLOR))
    return consts, polys


def gabor(c: Tensor, v1: Tensor, v2: Tensor, ntk: Optional[Tensor], need_dot: bool,
          full: bool, self_pairs: bool = False):
    """The ``Gabor`` dual map in one pass, the arithmetic of ``activations.Gabor.dual`` (the
    bounded quantities ``t = 2v / (1 + 2v)``, ``u = 1 / (1 + 2v)`` computed per example by the
    same torch code) after the correlation of :func:`relu`. Shapes and returns as :func:`relu`.
    """
    k = _kernels()
    consts, polys = _gabor_consts(c.dtype)
    a = gabor_per_example(v1)
    b = a if v2 is v1 else gabor_per_example(v2)
    arrs = tuple(x for pair in zip(a, b) for x in pair)  # (R1, R2, T1, T2, U1, U2, ST1, ...)
    return _dual_pass(k.gabor_serial, k.gabor_parallel, c, v1, v2, arrs, (consts,) + polys,
                      ntk, need_dot, full, self_pairs)


def exp_normalized(c: Tensor, v1: Tensor, v2: Tensor, ntk: Optional[Tensor], need_dot: bool,
                   full: bool, self_pairs: bool = False, *, gamma: float, shift: float):
    """The ``ExpNormalized(gamma, shift)`` dual map in one pass (``nngp' = sqrt(v1) sqrt(v2)
    exp(gamma (rho + shift))``, ``dot = gamma exp(...)``), the arithmetic of
    ``activations.ExpNormalized.dual``. Shapes and returns as :func:`relu`."""
    k = _kernels()
    consts = _consts(c.dtype, 0.0, 1.0, SNAP_ULPS * torch.finfo(c.dtype).eps, shift, gamma)
    s1, r1 = v1.sqrt(), inv_sqrt(v1)
    s2, r2 = (s1, r1) if v2 is v1 else (v2.sqrt(), inv_sqrt(v2))
    f32 = c.dtype == torch.float32
    kx = _consts(c.dtype, *(k.EXP_KX_F32 if f32 else k.EXP_KX_F64))
    px = _consts(c.dtype, *(k.EXP_R_F32 if f32 else k.EXP_R_F64))
    return _dual_pass(k.expn_serial, k.expn_parallel, c, v1, v2, (r1, r2, s1, s2),
                      (consts, kx, px), ntk, need_dot, full, self_pairs)


def fc_chain(c: Tensor, ntk: Optional[Tensor], want_ntk: bool,
             stages: Sequence[Tuple[int, Tuple[float, ...]]],
             per1: Sequence[Tuple[Tensor, ...]], per2: Sequence[Tuple[Tensor, ...]]
             ) -> Tuple[Tensor, Optional[Tensor]]:
    """A run of fully-connected layers in one pass over the ``(n1, n2)`` tile ``c`` (input
    NNGP; ``ntk``: input NTK, ``None`` for zero): see ``_chain_row`` in ``_fused_kernels``.

    ``stages``: ``(code, numbers)`` per layer (0 Dense ``(w2, b2, standard, width, bias)``,
    1 arc-cosine ``(f, h)``, 2 ExpNormalized ``(shift, gamma)``, 3 Gabor ``()``); each Dense is
    folded into the dual map that follows it. ``per1`` / ``per2``: for each activation in
    order, the per-example numbers of its input variances for x1's / x2's examples:
    ``(1/sqrt(v), sqrt(v))``, or :func:`gabor_per_example` for Gabor. Returns
    ``(nngp, ntk or None)`` after the run, marked :func:`~ntkit.layers._ops.mark_finite` when
    every entry is finite."""
    k = _kernels()
    n1, n2 = c.shape
    dt = c.dtype
    f32 = dt == torch.float32
    ty = np.float32 if f32 else np.float64
    ops = []      # (code, (w2, b2, p, r, a0, a1))
    pre = None    # a Dense waiting for the activation after it
    for code, nums in stages:
        if code == 0:
            if pre is not None:
                ops.append((0, pre + (0.0, 0.0)))
            w2, b2, standard, width, bias = nums
            pre = (w2, b2, width, bias) if standard else (w2, b2, w2, b2)
        else:
            nums = tuple(nums) + (0.0,) * (2 - len(nums))
            ops.append((code, (pre if pre is not None else (1.0, 0.0, 0.0, 0.0)) + nums))
            pre = None
    if pre is not None:
        ops.append((0, pre + (0.0, 0.0)))
    codes = np.array([o[0] for o in ops], dtype=np.int64)
    P = np.array([x for o in ops for x in o[1]], dtype=ty)
    aidx = np.zeros(len(ops), dtype=np.int64)
    a = 0
    for i, (code, _) in enumerate(ops):
        if code:
            aidx[i] = a
            a += 1

    def flat(pairs, which):
        if not pairs:
            return np.zeros(1, dtype=ty)
        return np.concatenate([_np(p[which]) for p in pairs]) if len(pairs) > 1 \
            else _np(pairs[0][which])

    def extra(per):  # Gabor's (u, sqrt(t), sqrt(u)) rows; unread (zeros) for other activations
        if not any(len(p) > 2 for p in per):
            return np.zeros((3, 1), dtype=ty)
        return np.stack([np.concatenate([_np(p[i]) if len(p) > i else
                                         np.zeros(p[0].numel(), dtype=ty) for p in per])
                         for i in (2, 3, 4)])
    out = torch.empty((n1, n2), dtype=dt, device="cpu")  # (CPU-only kernels)
    d = torch.empty_like(out) if want_ntk else out
    has_t = want_ntk and ntk is not None
    nt = _np(ntk) if has_t and ntk is not None else d.numpy().reshape(-1)
    consts = _consts(dt, 0.0, 1.0, math.pi, math.pi / 2, SNAP_ULPS * torch.finfo(dt).eps)
    coef = _consts(dt, *(k.ATAN_F32 if f32 else k.ATAN_F64))
    kx = _consts(dt, *(k.EXP_KX_F32 if f32 else k.EXP_KX_F64))
    px = _consts(dt, *(k.EXP_R_F32 if f32 else k.EXP_R_F64))
    kg, (pe, ps, pc) = _gabor_consts(dt)
    bad = np.zeros(n1, dtype=np.int64)
    _call(k.chain_serial, k.chain_parallel, _np(c), nt, out.numpy().reshape(-1),
          d.numpy().reshape(-1), n1, n2, codes, P, aidx, flat(per1, 0), flat(per1, 1),
          flat(per2, 0), flat(per2, 1), extra(per1), extra(per2), has_t, bool(want_ntk),
          consts, coef, kx, px, kg, pe, ps, pc, bad, rows=n1)
    if not bad.any():  # (the kernel looked at every output it wrote)
        mark_finite(out)
        if want_ntk:
            mark_finite(d)
    return out, (d if want_ntk else None)


def row_keys(flat: Tensor, w: Tensor) -> Tensor:
    """:func:`ntkit.layers._ops.row_keys` of a contiguous CPU float32/float64 ``(n, d)`` tensor in
    one pass (no int64 copy of the data, no product array): ``sum_j bits[i, j] * w[j]`` with
    wrap-around, ``bits`` sign-extended, ``w`` the ``(d,)`` int64 weights: the torch formula's
    keys, bit for bit."""
    k = _kernels()
    bits = flat.numpy().view(np.int32 if flat.dtype == torch.float32 else np.int64)
    out = np.empty(bits.shape[0], dtype=np.int64)
    _call(k.row_keys_serial, k.row_keys_parallel, bits, w.numpy(), out,
          rows=bits.shape[0] // 64)
    return torch.from_numpy(out)
