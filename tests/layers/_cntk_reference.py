"""A slow, obviously-correct CNTK reference (numpy, float64), written from the math alone.

Independent of ntkit: no import from the library. It keeps the *full* pixel-pair covariance of
the concatenated batch ``X = [x1; x2]`` (``K[a, b, P, Q]``, ``a, b`` examples, ``P, Q`` flat pixel
indices) and applies every layer with explicit Python loops over output pixel pairs and filter
taps. Conventions are neural-tangents' (NTK parameterization unless stated):

* input: ``K[a, b, P, Q] = sum_c X[a, c, P] X[b, c, Q] / C``, ``T = 0`` (NTK);
* ``('conv', C_out, W, b, filt, strides, padding[, 'standard'])``: for output pixels ``P, Q`` and
  taps ``s`` of the filter ``F``, ``p = P * stride + s - lo`` (per dimension; zero outside the
  image, or wrapped for 'CIRCULAR'),
  ``K'(P, Q) = W^2 / |F| sum_s K(p, q) + b^2``, ``T'(P, Q) = K'(P, Q) + W^2 / |F| sum_s T(p, q)``;
  'standard': ``T' = C_in sum_s K(p, q) + [1 if bias] + W^2 / |F| sum_s T(p, q)``;
  'SAME'/'CIRCULAR' pad ``total = max((out - 1) stride + f - n, 0)``, ``lo = total // 2``;
  an int ``p`` pads ``p`` zeros on both sides;
* ``('relu',)``: arc-cosine formulas, ``theta = 0`` exactly when both variables are the same unit
  (same example and pixel), ``T' = T * (pi - theta) / (2 pi)``;
* ``('avgpool', window, strides, padding)``: ``K'(P, Q) = 1/|w|^2 sum_{s, t} K(p_s, q_t)``, zero
  padding counted (``count_include_pad``); ``('sumpool', ...)`` without ``1/|w|^2``;
* ``('gap',)``: mean over ``P, Q``; ``('gsp',)``: sum; ``('flatten',)``: mean over ``P`` of
  ``K(P, P)``;
* ``('dense', C_out, W, b)``: ``K' = W^2 K + b^2``, ``T' = K' + W^2 T`` (per pixel if spatial);
* ``('layernorm', eps)`` over channels: ``K'(a, b, P, Q) = K / sqrt((v_aP + eps)(v_bQ + eps))``,
  ``v_aP = K(a, a, P, P)``, the same scale on ``T``;
* ``('residual', [layers])``: ``x + branch(x)``: kernels add.

Example::

    >>> nngp, ntk = cntk(x1, x2, [('conv', 8, 1.0, 0.1, (3, 3), (1, 1), 'SAME'), ('relu',),
    ...                           ('gap',), ('dense', 1, 1.0, 0.0)])
"""
from __future__ import annotations

import itertools
import math

import numpy as np


class _State:
    """Full covariance K, T of shape (N, N, *S, *S) (spatial) or (N, N) (fully connected)."""

    def __init__(self, K, T, spatial, chan):
        self.K, self.T, self.spatial, self.chan = K, T, spatial, chan


def _pads(n, f, s, padding):
    if isinstance(padding, int):  # explicit zero padding on both sides (torch.nn.Conv2d)
        return padding, (n + 2 * padding - f) // s + 1
    if padding == "VALID":
        return 0, (n - f) // s + 1
    out = -(-n // s)
    total = max((out - 1) * s + f - n, 0)
    return total // 2, out


def _geometry(spatial, filt, strides, padding):
    los, outs = zip(*(_pads(n, f, s, padding) for n, f, s in zip(spatial, filt, strides)))
    return los, outs


def _src(P, s, stride, lo, n, circular):
    """Input index of output pixel P shifted by tap s, or None if it falls in the zero padding."""
    p = P * stride + s - lo
    if circular:
        return p % n
    return p if 0 <= p < n else None


def _src_multi(P, s, strides, los, spatial, circular):
    out = []
    for Pd, sd, st, lo, n in zip(P, s, strides, los, spatial):
        p = _src(Pd, sd, st, lo, n, circular)
        if p is None:
            return None
        out.append(p)
    return tuple(out)


def _conv(st, C_out, W, b, filt, strides, padding, param="ntk"):
    S = st.spatial
    los, outs = _geometry(S, filt, strides, padding)
    circ = padding == "CIRCULAR"
    N = st.K.shape[0]
    area = math.prod(filt)
    K2 = np.zeros((N, N) + outs + outs)
    T2 = np.zeros((N, N) + outs + outs)
    Ksum = np.zeros((N, N))
    Tsum = np.zeros((N, N))
    for P in itertools.product(*(range(o) for o in outs)):
        for Q in itertools.product(*(range(o) for o in outs)):
            Ksum[:] = 0.0
            Tsum[:] = 0.0
            for s in itertools.product(*(range(f) for f in filt)):
                p = _src_multi(P, s, strides, los, S, circ)
                q = _src_multi(Q, s, strides, los, S, circ)
                if p is None or q is None:
                    continue
                Ksum += st.K[(slice(None), slice(None)) + p + q]
                Tsum += st.T[(slice(None), slice(None)) + p + q]
            idx = (slice(None), slice(None)) + P + Q
            K2[idx] = W ** 2 / area * Ksum + (b or 0.0) ** 2
            if param == "ntk":
                T2[idx] = K2[idx] + W ** 2 / area * Tsum
            else:
                T2[idx] = st.chan * Ksum + (0.0 if b is None else 1.0) + W ** 2 / area * Tsum
    return _State(K2, T2, outs, C_out)


def _pool(st, window, strides, padding, average=True):
    S = st.spatial
    los, outs = _geometry(S, window, strides, padding)
    circ = padding == "CIRCULAR"
    N = st.K.shape[0]
    scale = 1.0 / math.prod(window) ** 2 if average else 1.0
    K2 = np.zeros((N, N) + outs + outs)
    T2 = np.zeros((N, N) + outs + outs)
    for P in itertools.product(*(range(o) for o in outs)):
        for Q in itertools.product(*(range(o) for o in outs)):
            idx = (slice(None), slice(None)) + P + Q
            for s in itertools.product(*(range(w) for w in window)):
                p = _src_multi(P, s, strides, los, S, circ)
                if p is None:
                    continue
                for t in itertools.product(*(range(w) for w in window)):
                    q = _src_multi(Q, t, strides, los, S, circ)
                    if q is None:
                        continue
                    K2[idx] += scale * st.K[(slice(None), slice(None)) + p + q]
                    T2[idx] += scale * st.T[(slice(None), slice(None)) + p + q]
    return _State(K2, T2, outs, st.chan)


def _flat(st):
    """(N, N, pix, pix) views of a spatial state (or (N, N, 1, 1) for FC)."""
    N = st.K.shape[0]
    pix = math.prod(st.spatial) if st.spatial is not None else 1
    return st.K.reshape(N, N, pix, pix), st.T.reshape(N, N, pix, pix), pix


def _unflat(K, T, st, chan=None):
    N = K.shape[0]
    shape = (N, N) + (st.spatial + st.spatial if st.spatial is not None else ())
    return _State(K.reshape(shape), T.reshape(shape), st.spatial,
                  st.chan if chan is None else chan)


def _variances(K):
    """v[a, P] = K[a, a, P, P] for a (N, N, pix, pix) covariance."""
    N, _, pix, _ = K.shape
    v = np.empty((N, pix))
    for a in range(N):
        for P in range(pix):
            v[a, P] = K[a, a, P, P]
    return v


def _relu(st):
    K, T, pix = _flat(st)
    N = K.shape[0]
    v = _variances(K)
    K2 = np.empty_like(K)
    dot = np.empty_like(K)
    for a in range(N):
        for b in range(N):
            for P in range(pix):
                for Q in range(pix):
                    norm = math.sqrt(v[a, P] * v[b, Q])
                    c = K[a, b, P, Q]
                    if a == b and P == Q:
                        th = 0.0  # the same Gaussian variable: correlation exactly 1
                    else:
                        th = math.acos(max(-1.0, min(1.0, c / norm)))
                    K2[a, b, P, Q] = norm * (math.sin(th) + (math.pi - th) * math.cos(th)) \
                        / (2 * math.pi)
                    dot[a, b, P, Q] = (math.pi - th) / (2 * math.pi)
    return _unflat(K2, T * dot, st)


def _layernorm(st, eps):
    K, T, pix = _flat(st)
    v = _variances(K)
    scale = 1.0 / np.sqrt((v[:, None, :, None] + eps) * (v[None, :, None, :] + eps))
    return _unflat(K * scale, T * scale, st)


def _dense(st, C_out, W, b, param="ntk"):
    K2 = W ** 2 * st.K + (b or 0.0) ** 2
    if param == "ntk":
        T2 = K2 + W ** 2 * st.T
    else:
        T2 = st.chan * st.K + (0.0 if b is None else 1.0) + W ** 2 * st.T
    return _State(K2, T2, st.spatial, C_out)


def _apply(st, layer):
    kind = layer[0]
    if kind == "conv":
        return _conv(st, *layer[1:])
    if kind in ("avgpool", "sumpool"):
        return _pool(st, *layer[1:], average=kind == "avgpool")
    if kind == "relu":
        return _relu(st)
    if kind == "dense":
        return _dense(st, *layer[1:])
    if kind == "layernorm":
        return _layernorm(st, layer[1])
    if kind in ("gap", "gsp"):
        K, T, pix = _flat(st)
        red = (lambda t: t.mean((2, 3))) if kind == "gap" else (lambda t: t.sum((2, 3)))
        return _State(red(K), red(T), None, st.chan)
    if kind == "flatten":
        K, T, pix = _flat(st)
        idx = np.arange(pix)
        return _State(K[:, :, idx, idx].mean(-1), T[:, :, idx, idx].mean(-1), None,
                      st.chan * pix)
    if kind == "residual":
        br = st
        for sub in layer[1]:
            br = _apply(br, sub)
        return _State(st.K + br.K, st.T + br.T, st.spatial, st.chan)
    raise ValueError(f"unknown reference layer {layer!r}")


def cntk(x1, x2, layers):
    """``(nngp, ntk)``, each ``(n1, n2)`` float64 numpy arrays, of ``layers`` between x1, x2.

    ``x1``: ``(n1, C, *S)`` (or ``(n1, d)``), ``x2``: ``(n2, ...)`` or ``None`` (= x1).
    """
    x1 = np.asarray(x1, dtype=np.float64)
    x2 = x1 if x2 is None else np.asarray(x2, dtype=np.float64)
    n1 = x1.shape[0]
    X = np.concatenate([x1, x2])
    N, C = X.shape[:2]
    spatial = tuple(X.shape[2:])
    A = X.reshape(N, C, -1)
    K = np.einsum("acp,bcq->abpq", A, A) / C
    K = K.reshape((N, N) + spatial + spatial) if spatial else K.reshape(N, N)
    st = _State(K, np.zeros_like(K), spatial or None, C)
    for layer in layers:
        st = _apply(st, layer)
    if st.spatial is not None:
        raise ValueError("the reference network must end fully connected (GAP/Flatten/...)")
    return st.K[:n1, n1:], st.T[:n1, n1:]
