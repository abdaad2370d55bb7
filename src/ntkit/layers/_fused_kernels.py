"""Numba kernels behind :mod:`ntkit.layers._fused` (imported only when numba is installed).

Every kernel walks whole pixel planes (``P`` contiguous numbers) in its innermost loop, so LLVM
vectorizes it, and computes in the storage dtype (float32 stays float32, as in the torch path).
Constants come in as tuples of that dtype (``K = (0, 1, pi, pi/2, f, h, tol)``; ``A``: polynomial
coefficients), so nothing is promoted to float64 by accident.

The arc-cosine angle ``theta = atan2(s, c)`` (``s >= 0``) is reduced to ``atan(t)``,
``t = min(|c|, s) / max(|c|, s)`` in ``[0, 1]``, then ``theta = pi/2 - atan(t)`` if ``s > |c|``
and ``pi - theta`` if ``c < 0``; ``atan(t) = t + t^3 g(t^2)`` with ``g`` a polynomial fitted to
Chebyshev nodes on ``[0, 1]`` (degree 8 for float32: 1.0e-7 relative, under one ulp; degree 20
for float64: 2.2e-16), so there is one division and no library call: the loop vectorizes.
Coefficients: :data:`ATAN_F32`, :data:`ATAN_F64` (highest degree first; derived in
``tests/layers/test_fused.py``, which checks them against ``numpy.arctan``).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]  # (numba's own dependency)
from numba import njit, prange, types, uint64
from numba.extending import intrinsic, overload

ATAN_F32 = (-0.0024470311881932658, 0.013750284156159608, -0.03627017419515582,
            0.0628436091068393, -0.08673170869031231, 0.11037994282193359, -0.14279110915778248,
            0.1999976599856871, -0.3333333195079797)
ATAN_F64 = (-6.341547937287325e-06, 8.085744031772107e-05, -0.0004871669016594701,
            0.0018543026037415602, -0.00504044746322675, 0.010520519863906211,
            -0.017783082611514938, 0.02549181132808594, -0.0323834020133781,
            0.03802224039926275, -0.042797293109198234, 0.04743174021497816,
            -0.05259108805649772, 0.058816788983540105, -0.0666658251899143, 0.07692300090031509,
            -0.0909090861799711, 0.11111111092285501, -0.14285714285287895, 0.19999999999995574,
            -0.33333333333333315)

_JIT: Dict[str, Any] = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
# helpers are inlined at numba-IR level so that LLVM sees (and vectorizes) one flat loop
_INLINE: Dict[str, Any] = dict(_JIT, inline="always")


def horner(A, x):  # pragma: no cover - replaced by the overload in compiled code
    """``A[0] x^(n-1) + ... + A[n-1]``."""
    u = 0.0
    for a in A:
        u = u * x + a
    return u


@overload(horner, inline="always")
def _horner_impl(A, x):
    # written out for the tuple's length: a loop over a tuple compiles to a jump table, which
    # blocks vectorization
    n = A.count
    expr = "A[0]"
    for i in range(1, n):
        expr = f"({expr}) * x + A[{i}]"
    scope = {}
    exec(f"def impl(A, x):\n    return {expr}\n", scope)
    return scope["impl"]


@njit(**_INLINE)
def theta(ts, tc, K, A):
    """``atan2(ts, tc)`` for ``ts >= 0`` (in ``[0, pi]``); ``pi / 2`` when both are zero."""
    # (local names are unique: numba inlines this into callers at IR level)
    th_zero = K[0]
    th_ax = abs(tc)
    th_mx = max(th_ax, ts)
    th_mn = min(th_ax, ts)
    th_t = th_mn / th_mx if th_mx > th_zero else th_zero
    th_x2 = th_t * th_t
    th_r = th_t + th_t * th_x2 * horner(A, th_x2)
    th_r = K[3] - th_r if ts > th_ax else th_r
    th_r = K[2] - th_r if tc < th_zero else th_r
    return th_r if th_mx > th_zero else K[3]


# ---- arc-cosine (ABRelu family) dual map ------------------------------------------------------
# In normalized form (no product of variances, so nothing over/underflows where the result is
# representable), the arithmetic of the torch path (ntkit.layers._ops.correlation):
# rho = (c r1) r2 with r = 1/sqrt(v) (0 where v = 0), clipped into [-1, 1] and snapped to +-1
# within K[6] of it; gm = sqrt(v1) sqrt(v2), s = sqrt((1 - rho)(1 + rho)),
# theta = atan2(s, rho), dot = h - f theta, nngp' = (f s + dot rho) gm.
# C, OUT, D, NTK: flat (M * R * Q); row (m, r) covers Q numbers. Per-example pixel variances
# v1 at [ia[m] * R + r] paired with v2 at [ib[m] * Q + q] (full: pixel pairs), or both at
# [ia[m] * Q + q], [ib[m] * Q + q] (diag), given as S1, S2 (square roots) and R1, R2 (inverse
# square roots, 0 for v = 0). mode 0: D = NTK * dot; 1: D = dot; 2: no D.
# K = (0, 1, pi, pi/2, f, h, snap tolerance).

@njit(**_INLINE)
def _relu_one(c, ra, rb, sa, sb, K, A):
    """``(nngp', dot)`` of one entry (inlined into the row loops; local names unique)."""
    ro_zero, ro_one, ro_f, ro_h, ro_tol = K[0], K[1], K[4], K[5], K[6]
    ro_rho = min(max((c * ra) * rb, -ro_one), ro_one)
    ro_sgn = ro_one if ro_rho > ro_zero else -ro_one
    ro_rho = ro_sgn if abs(ro_rho) >= ro_one - ro_tol else ro_rho
    ro_s = math.sqrt(max((ro_one - ro_rho) * (ro_one + ro_rho), ro_zero))
    ro_dot = ro_h - ro_f * theta(ro_s, ro_rho, K, A)
    return (ro_f * ro_s + ro_dot * ro_rho) * (sa * sb), ro_dot


@njit(**_INLINE)
def _relu_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, A, row):
    # Flat unsigned indices: numba wraps negative signed indices around, a select per access
    # that blocks vectorization; with uint64 there is no such check.
    m = row // R
    r = row - m * R
    base = uint64(row * Q)
    b2 = uint64(ib[m] * Q)
    b1 = uint64(ia[m] * Q)
    n = uint64(Q)
    if full:
        i1 = ia[m] * R + r
        a = R1[i1]
        sa = S1[i1]
        if mode == 0:
            for q in range(n):
                o, dot = _relu_one(C[base + q], a, R2[b2 + q], sa, S2[b2 + q], K, A)
                OUT[base + q] = o
                D[base + q] = NTK[base + q] * dot
        else:
            for q in range(n):
                o, dot = _relu_one(C[base + q], a, R2[b2 + q], sa, S2[b2 + q], K, A)
                OUT[base + q] = o
                if mode == 1:
                    D[base + q] = dot
    else:
        if mode == 0:
            for q in range(n):
                o, dot = _relu_one(C[base + q], R1[b1 + q], R2[b2 + q], S1[b1 + q],
                                   S2[b2 + q], K, A)
                OUT[base + q] = o
                D[base + q] = NTK[base + q] * dot
        else:
            for q in range(n):
                o, dot = _relu_one(C[base + q], R1[b1 + q], R2[b2 + q], S1[b1 + q],
                                   S2[b2 + q], K, A)
                OUT[base + q] = o
                if mode == 1:
                    D[base + q] = dot


@njit(**_JIT)
def relu_serial(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, A):
    for row in range(ia.shape[0] * R):
        _relu_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, A, row)


@njit(parallel=True, **_JIT)
def relu_parallel(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, A):
    for row in prange(ia.shape[0] * R):
        _relu_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, A, row)


# ---- conv stencil, stride 1, output size = input size ----------------------------------------
# A plane is one (H, W) image of P = H W numbers. Full layout T (M, H, W, H, W): plane (m, p)
# holds the covariances of pixel p of x1 with every pixel of x2; diag layout T (M, H, W): one
# plane per m. For each output plane and tap d = (k1 - lo1, k2 - lo2):
#   out[q] += T[src plane][q + d1 W + d2]   over q with q1 + d1 in [0, H), q2 + d2 in [0, W)
# (src plane = (m, p + d), skipped outside the image, for full; m itself for diag). The q2
# condition is a 0/1 column mask MK[k2, q] (exact: finite values times 1 or 0), so each tap is
# one long contiguous loop. out = beta + alpha * sum (or BASE[...] + alpha * sum).

@njit(**_INLINE)
def _plane_index(pl, P, W, full):
    """Output plane ``pl`` as ``(m, p1, p2)``: full layout ``pl = m P + p1 W + p2``; diagonal
    layout ``pl = m`` (one plane per entry)."""
    if full:
        m = pl // P
        p = pl - m * P
        p1 = p // W
        return m, p1, p - p1 * W
    return pl, 0, 0


@njit(**_INLINE)
def _conv_plane(T, O, BASE, has_base, MK, H, W, f1, f2, lo1, lo2, alpha, beta, full, pl, acc):
    """Any filter: one accumulation loop per tap over its valid range (flat uint64 indices,
    see ``_relu_row``); ``MK[k2]`` masks the column wrap of shifted taps."""
    P = H * W
    zero = beta - beta
    for q in range(uint64(P)):
        acc[q] = zero
    m, p1, p2 = _plane_index(pl, P, W, full)
    for k1 in range(f1):
        d1 = k1 - lo1
        if full and (p1 + d1 < 0 or p1 + d1 >= H):
            continue
        qa = max(0, -d1) * W
        qb = min(H, H - d1) * W
        for k2 in range(f2):
            d2 = k2 - lo2
            if full and (p2 + d2 < 0 or p2 + d2 >= W):
                continue
            sh = d1 * W + d2
            lo = max(qa, -sh)
            hi = min(qb, P - sh)
            if hi <= lo:
                continue
            sp = (m * P + (p1 + d1) * W + (p2 + d2)) * P if full else m * P
            src = uint64(sp + sh + lo)
            a0 = uint64(lo)
            cnt = uint64(hi - lo)
            if d2 == 0:
                for q in range(cnt):
                    acc[a0 + q] += T[src + q]
            else:
                mb = uint64(k2 * P + lo)
                for q in range(cnt):
                    acc[a0 + q] += T[src + q] * MK[mb + q]
    ob = uint64(pl * P)
    if has_base:
        for q in range(uint64(P)):
            O[ob + q] = BASE[ob + q] + alpha * acc[q]
    else:
        for q in range(uint64(P)):
            O[ob + q] = beta + alpha * acc[q]


@njit(**_INLINE)
def _tap_start(full, m, p1, p2, e1, e2, H, W, r0, r1, q0, mg, zoff):
    """Index in the padded source of tap ``(e1, e2)`` at the first output of rows
    ``[r0, r1)`` of plane ``(m, p1, p2)``; the zero block when the tap leaves the image."""
    P = H * W
    ok = r0 + e1 >= 0 and r1 - 1 + e1 < H
    if full:
        ok = ok and 0 <= p1 + e1 < H and 0 <= p2 + e2 < W
        sp = m * P + (p1 + e1) * W + (p2 + e2)
    else:
        sp = m
    sh = e1 * W + e2 + q0
    return uint64(mg + sp * P + sh) if ok else uint64(zoff + sh)


@njit(**_INLINE)
def _conv3x3_plane(Tp, O, BASE, has_base, MK, H, W, lo1, lo2, alpha, beta, full, zoff, pl):
    """One output plane of a 3x3 stencil: the nine taps in one vectorized loop.

    ``Tp``: the source with ``2 W + 2`` zeros (the largest tap shift) before and after, then a
    zero block (at ``zoff``, ``P`` zeros with such margins). Rows are cut into segments (each top/bottom edge
    row, and the band where every row tap is inside the image); a tap whose source pixel or
    row is outside the image reads the zero block, so it adds exact zeros. Shifted reads of the
    left/right tap columns reach into the neighbouring row (finite values): the column masks
    ``MK`` (0/1) zero them. Flat uint64 indices (see ``_relu_row``).
    """
    P = H * W
    mg = 2 * W + 2
    m, p1, p2 = _plane_index(pl, P, W, full)
    d1 = -lo1
    d2 = -lo2
    top = min(H, max(0, -d1))
    bot = max(top, min(H, H - d1 - 2))
    for seg in range(top + 1 + H - bot):
        if seg < top:
            r0, r1 = seg, seg + 1
        elif seg == top:
            r0, r1 = top, bot
        else:
            r0 = bot + seg - top - 1
            r1 = r0 + 1
        if r1 <= r0:
            continue
        q0 = r0 * W
        # start index of each tap for this segment (source plane valid and row tap inside)
        s00 = _tap_start(full, m, p1, p2, d1, d2, H, W, r0, r1, q0, mg, zoff)
        s01 = _tap_start(full, m, p1, p2, d1, d2 + 1, H, W, r0, r1, q0, mg, zoff)
        s02 = _tap_start(full, m, p1, p2, d1, d2 + 2, H, W, r0, r1, q0, mg, zoff)
        s10 = _tap_start(full, m, p1, p2, d1 + 1, d2, H, W, r0, r1, q0, mg, zoff)
        s11 = _tap_start(full, m, p1, p2, d1 + 1, d2 + 1, H, W, r0, r1, q0, mg, zoff)
        s12 = _tap_start(full, m, p1, p2, d1 + 1, d2 + 2, H, W, r0, r1, q0, mg, zoff)
        s20 = _tap_start(full, m, p1, p2, d1 + 2, d2, H, W, r0, r1, q0, mg, zoff)
        s21 = _tap_start(full, m, p1, p2, d1 + 2, d2 + 1, H, W, r0, r1, q0, mg, zoff)
        s22 = _tap_start(full, m, p1, p2, d1 + 2, d2 + 2, H, W, r0, r1, q0, mg, zoff)
        k0, k1_, k2_ = uint64(q0), uint64(P + q0), uint64(2 * P + q0)
        ob = uint64(pl * P + q0)
        n = uint64((r1 - r0) * W)
        if has_base:
            for q in range(n):
                sl = (Tp[s00 + q] + Tp[s10 + q] + Tp[s20 + q]) * MK[k0 + q]
                sm = (Tp[s01 + q] + Tp[s11 + q] + Tp[s21 + q]) * MK[k1_ + q]
                sr = (Tp[s02 + q] + Tp[s12 + q] + Tp[s22 + q]) * MK[k2_ + q]
                O[ob + q] = BASE[ob + q] + alpha * ((sl + sm) + sr)
        else:
            for q in range(n):
                sl = (Tp[s00 + q] + Tp[s10 + q] + Tp[s20 + q]) * MK[k0 + q]
                sm = (Tp[s01 + q] + Tp[s11 + q] + Tp[s21 + q]) * MK[k1_ + q]
                sr = (Tp[s02 + q] + Tp[s12 + q] + Tp[s22 + q]) * MK[k2_ + q]
                O[ob + q] = beta + alpha * ((sl + sm) + sr)


@njit(**_JIT)
def conv3x3_serial(Tp, O, BASE, has_base, MK, H, W, lo1, lo2, alpha, beta, full, zoff, planes):
    for pl in range(planes):
        _conv3x3_plane(Tp, O, BASE, has_base, MK, H, W, lo1, lo2, alpha, beta, full, zoff, pl)


@njit(parallel=True, **_JIT)
def conv3x3_parallel(Tp, O, BASE, has_base, MK, H, W, lo1, lo2, alpha, beta, full, zoff,
                     planes):
    for pl in prange(planes):
        _conv3x3_plane(Tp, O, BASE, has_base, MK, H, W, lo1, lo2, alpha, beta, full, zoff, pl)


@njit(**_JIT)
def conv_serial(T, O, BASE, has_base, MK, H, W, f1, f2, lo1, lo2, alpha, beta, full, planes,
                acc):
    a = acc[0]
    for pl in range(planes):
        _conv_plane(T, O, BASE, has_base, MK, H, W, f1, f2, lo1, lo2, alpha, beta, full, pl, a)


@njit(parallel=True, **_JIT)
def conv_parallel(T, O, BASE, has_base, MK, H, W, f1, f2, lo1, lo2, alpha, beta, full, planes,
                  acc):
    nt = acc.shape[0]
    per = (planes + nt - 1) // nt
    for t in prange(nt):
        a = acc[t]
        for pl in range(t * per, min(planes, (t + 1) * per)):
            _conv_plane(T, O, BASE, has_base, MK, H, W, f1, f2, lo1, lo2, alpha, beta, full, pl,
                        a)


# ---- Gabor dual map (exp(-x^2) sin(x)) --------------------------------------------------------
# The arithmetic of the torch path (activations.Gabor.dual) in its bounded quantities, per entry:
# rho as in _relu_one (clipped, snapped); per example t = 2v / (1 + 2v), u = 1 / (1 + 2v) and
# their square roots st, su (arrays T*, U*, ST*, SU*; all in [0, 1], so no product of them
# overflows); om = (1 - rho)(1 + rho) >= 0, w2 = max(om t1 t2 + (u1 + t1 u2), tiny),
# X = ((t1 u2 + t2 u1) / 4 + t1 t2 om / 2) / w2, r = u1 u2 / w2,
# B = rho sqrt(t1 t2 u1 u2) / (2 w2), nngp' = sqrt(r) exp(-X) sinh(B),
# dot = (r sqrt(r) (1 + 2 rho^2 t1 t2 / w2) cosh(B)
#        + 2 r rho sqrt(t1 t2) (1 + (u1 u2 + (t1 u2 + t2 u1) / 2) / w2) sinh(B) / sqrt(w2)) exp(-X).
# Both arguments are bounded, so exp, sinh and cosh are short polynomials (no library call: the
# loop vectorizes): (t1 u2 + t2 u1) / 4 <= (u1 + t1 u2) / 4 and t1 t2 om / 2 <= t1 t2 om / 2 give
# 0 <= X <= 1/2; sqrt(u1 t1 u2 t2) <= (u1 + t1 u2) / 2 gives |B| <= 1/4. The polynomials are
# accurate to float64 roundoff on twice these ranges (X in [0, 1], |B| <= 1/2):
# exp(-X) = exp(-1/2) exp(z), z = 1/2 - X, Taylor to z^16 (error < 1e-18 relative);
# sinh(B) = B (1 + B^2/3! + ... + B^14/15!), cosh(B) = 1 + B^2/2! + ... + B^16/16!
# (coefficients EXP_TAYLOR, SINH_TAYLOR, COSH_TAYLOR, highest degree first; checked against
# numpy in tests/layers/test_fused_activations.py).
# Layout and modes as for the ReLU kernels. K = (0, 1, snap tolerance, tiny, 1/4, 1/2, 2,
# exp(-1/2)); PE, PS, PC = EXP_TAYLOR, SINH_TAYLOR, COSH_TAYLOR in the storage dtype.

EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(16, -1, -1))
SINH_TAYLOR = tuple(1.0 / math.factorial(2 * n + 1) for n in range(7, -1, -1))
COSH_TAYLOR = tuple(1.0 / math.factorial(2 * n) for n in range(8, -1, -1))


@njit(**_INLINE)
def _gabor_one(c, ra, rb, ta, tb, ua, ub, sta, stb, sua, sub, want_dot, K, PE, PS, PC):
    """``(nngp', dot)`` of one entry (``dot`` is 0 unless ``want_dot``; local names unique)."""
    gb_zero, gb_one, gb_tol, gb_tiny = K[0], K[1], K[2], K[3]
    gb_rho = min(max((c * ra) * rb, -gb_one), gb_one)
    gb_sgn = gb_one if gb_rho > gb_zero else -gb_one
    gb_rho = gb_sgn if abs(gb_rho) >= gb_one - gb_tol else gb_rho
    gb_om = max((gb_one - gb_rho) * (gb_one + gb_rho), gb_zero)
    gb_tt = ta * tb
    gb_w2 = max(gb_om * gb_tt + (ua + ta * ub), gb_tiny)
    gb_iw = gb_one / gb_w2
    gb_cu = ta * ub + tb * ua
    gb_e = K[7] * horner(PE, K[5] - (gb_cu * K[4] + gb_tt * gb_om * K[5]) * gb_iw)
    gb_r = (ua * gb_iw) * ub
    gb_sr = math.sqrt(gb_r)
    gb_st = sta * stb
    gb_b = gb_rho * gb_st * sua * sub * (gb_iw * K[5])
    gb_b2 = gb_b * gb_b
    gb_sh = gb_b * horner(PS, gb_b2)
    gb_nngp = gb_sr * gb_e * gb_sh
    if not want_dot:
        return gb_nngp, gb_zero
    gb_ch = gb_r * gb_sr * (gb_one + K[6] * gb_rho * gb_rho * gb_tt * gb_iw) * horner(PC, gb_b2)
    gb_sp = gb_r * K[6] * gb_rho * gb_st * (gb_one + (ua * ub + gb_cu * K[5]) * gb_iw) * gb_sh \
        * math.sqrt(gb_iw)
    return gb_nngp, (gb_ch + gb_sp) * gb_e


@njit(**_INLINE)
def _gabor_row(C, R1, R2, T1, T2, U1, U2, ST1, ST2, SU1, SU2, ia, ib, NTK, OUT, D, R, Q, mode,
               full, K, PE, PS, PC, row):
    # (flat uint64 indices, see _relu_row)
    m = row // R
    r = row - m * R
    base = uint64(row * Q)
    b2 = uint64(ib[m] * Q)
    b1 = uint64(ia[m] * Q)
    n = uint64(Q)
    if full:
        i1 = ia[m] * R + r
        ra, ta, ua, sta, sua = R1[i1], T1[i1], U1[i1], ST1[i1], SU1[i1]
        if mode == 0:
            for q in range(n):
                j = b2 + q
                o, dot = _gabor_one(C[base + q], ra, R2[j], ta, T2[j], ua, U2[j], sta, ST2[j],
                                    sua, SU2[j], True, K, PE, PS, PC)
                OUT[base + q] = o
                D[base + q] = NTK[base + q] * dot
        elif mode == 1:
            for q in range(n):
                j = b2 + q
                o, dot = _gabor_one(C[base + q], ra, R2[j], ta, T2[j], ua, U2[j], sta, ST2[j],
                                    sua, SU2[j], True, K, PE, PS, PC)
                OUT[base + q] = o
                D[base + q] = dot
        else:
            for q in range(n):
                j = b2 + q
                o, dot = _gabor_one(C[base + q], ra, R2[j], ta, T2[j], ua, U2[j], sta, ST2[j],
                                    sua, SU2[j], False, K, PE, PS, PC)
                OUT[base + q] = o
    else:
        for q in range(n):
            i = b1 + q
            j = b2 + q
            o, dot = _gabor_one(C[base + q], R1[i], R2[j], T1[i], T2[j], U1[i], U2[j], ST1[i],
                                ST2[j], SU1[i], SU2[j], mode != 2, K, PE, PS, PC)
            OUT[base + q] = o
            if mode == 0:
                D[base + q] = NTK[base + q] * dot
            elif mode == 1:
                D[base + q] = dot


@njit(**_JIT)
def gabor_serial(C, R1, R2, T1, T2, U1, U2, ST1, ST2, SU1, SU2, ia, ib, NTK, OUT, D, R, Q, mode,
                 full, K, PE, PS, PC):
    for row in range(ia.shape[0] * R):
        _gabor_row(C, R1, R2, T1, T2, U1, U2, ST1, ST2, SU1, SU2, ia, ib, NTK, OUT, D, R, Q,
                   mode, full, K, PE, PS, PC, row)


@njit(parallel=True, **_JIT)
def gabor_parallel(C, R1, R2, T1, T2, U1, U2, ST1, ST2, SU1, SU2, ia, ib, NTK, OUT, D, R, Q,
                   mode, full, K, PE, PS, PC):
    for row in prange(ia.shape[0] * R):
        _gabor_row(C, R1, R2, T1, T2, U1, U2, ST1, ST2, SU1, SU2, ia, ib, NTK, OUT, D, R, Q,
                   mode, full, K, PE, PS, PC, row)


# ---- exp without a library call (vectorizes) ------------------------------------------------
# exp(x) = 2^n exp(r), n = floor(x log2(e) + 1/2), r = (x - n ln2_hi) - n ln2_lo in
# [-ln2/2, ln2/2] (Cody-Waite: n ln2_hi is exact), exp(r) by Taylor to r^13 (float64, error
# 4e-18 relative) or r^8 (float32, 2e-10); 2^n applied as two powers of two built from their
# bits, so results in the subnormal range round once and n = 1024 gives inf. x is clipped to
# [XLO, XHI] (exp = 0 / inf beyond, +-inf included) and NaN propagates. Within a few ulp of the libm exp
# (checked in tests/layers/test_fused_activations.py).
# KX = (XLO, XHI, log2(e), ln2_hi, ln2_lo, 1/2); PX = EXP_R_F64 / EXP_R_F32 (storage dtype).

EXP_R_F64 = tuple(1.0 / math.factorial(n) for n in range(13, -1, -1))
EXP_R_F32 = tuple(1.0 / math.factorial(n) for n in range(8, -1, -1))
EXP_KX_F64 = (-746.0, 710.0, 1.4426950408889634, 6.93147180369123816490e-01,
              1.90821492927058770002e-10, 0.5)
EXP_KX_F32 = (-104.0, 89.0, 1.4426950408889634, 0.693359375, -2.12194440e-4, 0.5)


@intrinsic
def _pow2(typingctx, n):
    """``2^n`` for an integer-valued float ``n`` within the normal exponent range (built from
    its bits: float64 or float32 as ``n``)."""
    if not isinstance(n, types.Float):
        return None
    bits = n.bitwidth
    mant, bias = (52, 1023) if bits == 64 else (23, 127)

    def codegen(context, builder, sig, args):
        ity = ir.IntType(bits)
        k = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        return builder.bitcast(builder.shl(k, ir.Constant(ity, mant)), args[0].type)
    return n(n), codegen


@njit(**_INLINE)
def fexp(x, KX, PX):
    """``exp(x)`` in ``x``'s dtype (see above; local names unique)."""
    fx_y = min(max(x, KX[0]), KX[1])
    fx_n = np.floor(fx_y * KX[2] + KX[5])
    fx_r = (fx_y - fx_n * KX[3]) - fx_n * KX[4]
    fx_h = np.floor(fx_n * KX[5])
    fx_e = horner(PX, fx_r) * _pow2(fx_h) * _pow2(fx_n - fx_h)
    return fx_e if x == x else x


# ---- ExpNormalized dual map ------------------------------------------------------------------
# As activations.ExpNormalized.dual: rho as in _relu_one, e = exp((rho + shift) gamma) (fexp),
# nngp' = (e sqrt(v1)) sqrt(v2), dot = e gamma. K = (0, 1, snap tolerance, shift, gamma);
# KX, PX: see fexp.

@njit(**_INLINE)
def _expn_one(c, ra, rb, sa, sb, K, KX, PX):
    en_zero, en_one, en_tol = K[0], K[1], K[2]
    en_rho = min(max((c * ra) * rb, -en_one), en_one)
    en_sgn = en_one if en_rho > en_zero else -en_one
    en_rho = en_sgn if abs(en_rho) >= en_one - en_tol else en_rho
    en_e = fexp((en_rho + K[3]) * K[4], KX, PX)
    return (en_e * sa) * sb, en_e * K[4]


@njit(**_INLINE)
def _expn_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, KX, PX, row):
    m = row // R
    r = row - m * R
    base = uint64(row * Q)
    b2 = uint64(ib[m] * Q)
    b1 = uint64(ia[m] * Q)
    n = uint64(Q)
    if full:
        i1 = ia[m] * R + r
        a = R1[i1]
        sa = S1[i1]
        for q in range(n):
            o, dot = _expn_one(C[base + q], a, R2[b2 + q], sa, S2[b2 + q], K, KX, PX)
            OUT[base + q] = o
            if mode == 0:
                D[base + q] = NTK[base + q] * dot
            elif mode == 1:
                D[base + q] = dot
    else:
        for q in range(n):
            o, dot = _expn_one(C[base + q], R1[b1 + q], R2[b2 + q], S1[b1 + q], S2[b2 + q], K,
                               KX, PX)
            OUT[base + q] = o
            if mode == 0:
                D[base + q] = NTK[base + q] * dot
            elif mode == 1:
                D[base + q] = dot


@njit(**_JIT)
def expn_serial(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, KX, PX):
    for row in range(ia.shape[0] * R):
        _expn_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, KX, PX, row)


@njit(parallel=True, **_JIT)
def expn_parallel(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, KX, PX):
    for row in prange(ia.shape[0] * R):
        _expn_row(C, R1, R2, S1, S2, ia, ib, NTK, OUT, D, R, Q, mode, full, K, KX, PX, row)


# ---- fully-connected chains: a run of Dense and dual maps, entry by entry ---------------------
# An FC kernel's recursion is elementwise given per-example variances, so a run of layers
# [Dense | arc-cosine (ABRelu family) | ExpNormalized | Gabor] is one pass over the tile: each row is
# loaded once, taken through every layer while it sits in L1 (the output row is the working
# buffer) and stored once, instead of ~3 passes and fresh tile-sized arrays per layer.
# C, NT: the input nngp / ntk tile (flat n1 * n2); OUT, D: the outputs (D = NT * dot products:
# the NTK; with HAS_T False the run starts from a zero NTK; with WT False no NTK is carried).
# Op s: CODES[s] 0 = Dense alone, 1 = [Dense] + arc-cosine, 2 = [Dense] + ExpNormalized,
# 3 = [Dense] + Gabor; its
# numbers P[6 s .. 6 s + 5] = (w2, b2, p, r, a0, a1): the Dense step first,
#   c' = c w2 + b2,  t' = (c p + r) + w2 t
# (NTK parameterization: p = w2, r = b2, so t' = c' + w2 t; standard: p = width, r = 1 with a
# bias, else 0; an activation without a Dense before it in the run: w2 = 1, b2 = p = r = 0,
# which is exact), then the dual map with (f, h) = (a0, a1) or (shift, gamma) = (a0, a1):
# (c'', dot) = _relu_one / _expn_one(c', ...), t'' = t' dot.
# An activation reads its per-example numbers at column AIDX[s]: RA, SA (flat na * n1: 1/sqrt(v),
# sqrt(v) of x1's examples), RB, SB (na * n2, x2's); a Gabor op reads (1/sqrt(v), t) there and
# (u, sqrt(t), sqrt(u)) in the rows of GA (3, na * n1) / GB (3, na * n2) (see _gabor_one; other
# ops leave them unread). K = (0, 1, pi, pi/2, tol); A: atan coefficients; KX, PX: fexp's;
# KG, PE, PS, PC: _gabor_one's. BAD (n1, int64): per row, 1 if an output is not finite.

@njit(**_INLINE)
def _chain_row(C, NT, OUT, D, n1, n2, CODES, P, AIDX, RA, SA, RB, SB, GA, GB, HAS_T, WT, K, A,
               KX, PX, KG, PE, PS, PC, BAD, row):
    n = uint64(n2)
    base = uint64(row * n2)
    # the output row is the working buffer: copied in once, then every op works in place (an
    # op reading C and writing OUT would need a runtime overlap check on every later op, which
    # LLVM answers with the scalar loop)
    for q in range(n):
        OUT[base + q] = C[base + q]
    if WT:
        if HAS_T:
            for q in range(n):
                D[base + q] = NT[base + q]
        else:
            for q in range(n):
                D[base + q] = K[0]
    X = OUT
    Y = D
    for s in range(CODES.shape[0]):
        code = CODES[s]
        w2 = P[6 * s]
        b2 = P[6 * s + 1]
        pp = P[6 * s + 2]
        rr = P[6 * s + 3]
        a0 = P[6 * s + 4]
        a1 = P[6 * s + 5]
        if code == 0:
            if WT:
                for q in range(n):
                    c = X[base + q]
                    D[base + q] = (c * pp + rr) + w2 * Y[base + q]
                    OUT[base + q] = c * w2 + b2
            else:
                for q in range(n):
                    OUT[base + q] = X[base + q] * w2 + b2
            continue
        ia = uint64(AIDX[s] * n1 + row)
        ib = uint64(AIDX[s] * n2)
        ra = RA[ia]
        sa = SA[ia]
        if code == 1:
            KR = (K[0], K[1], K[2], K[3], a0, a1, K[4])
            if WT:
                for q in range(n):
                    c = X[base + q]
                    t = (c * pp + rr) + w2 * Y[base + q]
                    o, dot = _relu_one(c * w2 + b2, ra, RB[ib + q], sa, SB[ib + q], KR, A)
                    OUT[base + q] = o
                    D[base + q] = t * dot
            else:
                for q in range(n):
                    o, dot = _relu_one(X[base + q] * w2 + b2, ra, RB[ib + q], sa, SB[ib + q],
                                       KR, A)
                    OUT[base + q] = o
        elif code == 3:
            ua, sta, sua = GA[0, ia], GA[1, ia], GA[2, ia]
            if WT:
                for q in range(n):
                    c = X[base + q]
                    t = (c * pp + rr) + w2 * Y[base + q]
                    j = ib + q
                    o, dot = _gabor_one(c * w2 + b2, ra, RB[j], sa, SB[j], ua, GB[0, j], sta,
                                        GB[1, j], sua, GB[2, j], True, KG, PE, PS, PC)
                    OUT[base + q] = o
                    D[base + q] = t * dot
            else:
                for q in range(n):
                    j = ib + q
                    o, dot = _gabor_one(X[base + q] * w2 + b2, ra, RB[j], sa, SB[j], ua, GB[0, j],
                                        sta, GB[1, j], sua, GB[2, j], False, KG, PE, PS, PC)
                    OUT[base + q] = o
        else:
            KE = (K[0], K[1], K[4], a0, a1)
            if WT:
                for q in range(n):
                    c = X[base + q]
                    t = (c * pp + rr) + w2 * Y[base + q]
                    o, dot = _expn_one(c * w2 + b2, ra, RB[ib + q], sa, SB[ib + q], KE, KX, PX)
                    OUT[base + q] = o
                    D[base + q] = t * dot
            else:
                for q in range(n):
                    o, dot = _expn_one(X[base + q] * w2 + b2, ra, RB[ib + q], sa, SB[ib + q],
                                       KE, KX, PX)
                    OUT[base + q] = o
    # BAD[row] = 1 when the row's outputs hold an inf or NaN (x - x != 0 exactly then): the row
    # is still in L1, so the caller's overflow check need not read the tile again
    z = K[0]
    bad = 0
    for q in range(n):
        o = OUT[base + q]
        bad |= (o - o) != z
    if WT:
        for q in range(n):
            o = D[base + q]
            bad |= (o - o) != z
    BAD[row] = bad


@njit(**_JIT)
def chain_serial(C, NT, OUT, D, n1, n2, CODES, P, AIDX, RA, SA, RB, SB, GA, GB, HAS_T, WT, K, A,
                 KX, PX, KG, PE, PS, PC, BAD):
    for row in range(n1):
        _chain_row(C, NT, OUT, D, n1, n2, CODES, P, AIDX, RA, SA, RB, SB, GA, GB, HAS_T, WT, K,
                   A, KX, PX, KG, PE, PS, PC, BAD, row)


@njit(parallel=True, **_JIT)
def chain_parallel(C, NT, OUT, D, n1, n2, CODES, P, AIDX, RA, SA, RB, SB, GA, GB, HAS_T, WT, K,
                   A, KX, PX, KG, PE, PS, PC, BAD):
    for row in prange(n1):
        _chain_row(C, NT, OUT, D, n1, n2, CODES, P, AIDX, RA, SA, RB, SB, GA, GB, HAS_T, WT, K,
                   A, KX, PX, KG, PE, PS, PC, BAD, row)


# ---- row keys for the duplicate-row search ---------------------------------------------------
# ntkit.layers._ops.row_keys in one pass: the rows' bit patterns (B: (n, d) int32 or int64 view,
# sign-extended as the torch formula does) times fixed odd weights W (int64), summed with
# wrap-around (LLVM's plain integer add/mul wrap: exact, order-free).

@njit(**_INLINE)
def _row_key(B, W, i):
    acc = np.int64(0)
    for j in range(B.shape[1]):
        acc += np.int64(B[i, j]) * W[j]
    return acc


@njit(**_JIT)
def row_keys_serial(B, W, OUT):
    for i in range(B.shape[0]):
        OUT[i] = _row_key(B, W, i)


@njit(parallel=True, **_JIT)
def row_keys_parallel(B, W, OUT):
    for i in prange(B.shape[0]):
        OUT[i] = _row_key(B, W, i)
