"""Window sums over shifted pixels: the linear part of conv and pooling kernel maps.

A convolution with a ``f``-tap filter (stride ``s``, padding ``lo``) maps the pixel-pair covariance

    K'(P, Q) = 1/f * sum_{k < f} K(P s + k - lo, Q s + k - lo)        (zero outside the image)

along every spatial dimension: the *same* shift ``k`` moves both pixels. This is a fixed stencil of
``f`` shifted-slice additions per output entry and per spatial dimension (separable over
dimensions); it is evaluated here as ``f`` in-place adds of strided views, never as a
one-channel convolution. Pooling shifts the two pixels *independently* (one window sum per axis),
and on the per-pixel diagonal layout a conv is the same window sum on a single axis.

Cost: ``f - 1`` passes per output element and per spatial dimension: the first two taps in one
binary add (``out = x_a + x_b``, tiny border copies where ``x_b`` does not reach), then one
in-place add per further tap; an optional scale and base (``base + alpha * sum``) ride on the
first pass of the last dimension. Large pixel-pair arrays are processed a few entries at a time
(``STENCIL_CHUNK_BYTES``).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from . import _fused

Tensor = torch.Tensor

PADDINGS = ("VALID", "SAME", "CIRCULAR")
Pads = Tuple[Tuple[int, int], ...]


def check_padding(padding, name: str = "padding"):
    """Canonical padding: 'VALID' | 'SAME' | 'CIRCULAR', or explicit zero padding given as an int
    (all sides), one int per spatial dimension, or one ``(lo, hi)`` pair per dimension."""
    if isinstance(padding, str):
        if padding.upper() not in PADDINGS:
            raise ValueError(f"`{name}` must be one of {PADDINGS} or explicit pixel counts "
                             f"(int, per-dimension ints or (lo, hi) pairs), got {padding!r}")
        return padding.upper()
    bad = ValueError(f"`{name}` must be one of {PADDINGS} or non-negative pixel counts (an int, "
                     f"per-dimension ints or (lo, hi) pairs), got {padding!r}")
    if isinstance(padding, bool):
        raise bad
    if isinstance(padding, int):
        if padding < 0:
            raise bad
        return padding
    try:
        items = tuple(padding)
    except TypeError:
        raise bad from None
    out = []
    for it in items:
        if isinstance(it, int) and not isinstance(it, bool) and it >= 0:
            out.append((it, it))
        elif (isinstance(it, (tuple, list)) and len(it) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in it)):
            out.append((int(it[0]), int(it[1])))
        else:
            raise bad
    if not out:
        raise bad
    return tuple(out)


def check_mode(mode: str) -> str:
    if mode not in ("zeros", "circular"):
        raise ValueError(f"`padding_mode` must be 'zeros' or 'circular', got {mode!r}")
    return mode


def as_tuple(v, n: int, name: str) -> Tuple[int, ...]:
    """Broadcast an int (or check a sequence) to ``n`` positive ints."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"`{name}` has {len(v)} entries but the input has {n} spatial "
                         f"dimension(s); give {n} values or a single int")
    return v


def check_sizes(v, name: str):
    """Validate a filter/window/stride spec: a positive int or a non-empty tuple of them."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise ValueError(f"`{name}` must be positive, got {v!r}")
        return v
    try:
        t = tuple(v)
    except TypeError:
        raise ValueError(f"`{name}` must be a positive int or a tuple of them, got {v!r}") \
            from None
    if not t or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in t):
        raise ValueError(f"`{name}` must be a positive int or a tuple of them, got {v!r}")
    return t


def same_pads(length: int, f: int, s: int) -> Tuple[int, int]:
    """``(lo, hi)`` zero padding of 'SAME' (XLA/neural-tangents convention: extra at the end)."""
    out = -(-length // s)
    total = max((out - 1) * s + f - length, 0)
    return total // 2, total - total // 2


def resolve(padding, mode: str, spatial: Sequence[int], filt: Sequence[int],
            strides: Sequence[int]) -> Tuple[Pads, bool]:
    """Per-dimension ``(lo, hi)`` pads and whether they wrap around (circular)."""
    ns = len(spatial)
    if padding == "VALID":
        return ((0, 0),) * ns, False
    if padding in ("SAME", "CIRCULAR"):
        p = tuple(same_pads(n, f, s) for n, f, s in zip(spatial, filt, strides))
        return p, padding == "CIRCULAR" or mode == "circular"
    if isinstance(padding, int):
        p = ((padding, padding),) * ns
    else:
        p = padding
        if len(p) != ns:
            raise ValueError(f"`padding` has {len(p)} entries but the input has {ns} spatial "
                             f"dimension(s)")
    return tuple(p), mode == "circular"


def out_spatial(spatial: Sequence[int], filt: Sequence[int], strides: Sequence[int],
                pads: Pads, what: str) -> Tuple[int, ...]:
    out = []
    for d, (n, f, s, (lo, hi)) in enumerate(zip(spatial, filt, strides, pads)):
        if n + lo + hi < f:
            raise ValueError(f"a {what} of size {f} does not fit spatial dimension {d} of size "
                             f"{n} (padding {lo}+{hi}); pad more (e.g. padding='SAME') or use a "
                             f"smaller {what}")
        out.append((n + lo + hi - f) // s + 1)
    return tuple(out)


def wrap_pad(x: Tensor, axes: Sequence[int], lo: int, hi: int) -> Tensor:
    """Periodic padding of ``axes`` by ``(lo, hi)`` (any amount, like ``numpy.pad(mode='wrap')``)."""
    if lo == 0 and hi == 0:
        return x
    for a in axes:
        n = x.shape[a]
        idx = torch.arange(-lo, n + hi, device=x.device) % n
        x = x.index_select(a, idx)
    return x


def window_sum(x: Tensor, axes: Sequence[int], f: int, s: int, lo: int, hi: int,
               circular: bool = False, alpha: float = 1.0, base=None) -> Tensor:
    """``out[..P..] = base + alpha * sum_{k<f} x[..P s + k - lo..]`` with the same shift ``k`` on
    all ``axes``.

    ``axes`` all have the same length ``L``; positions outside ``[0, L)`` count as zero, or wrap
    around when ``circular``. Output length ``(L + lo + hi - f) // s + 1``. ``base`` (optional) is
    a number or a tensor broadcastable to the output. Returns a new contiguous tensor.

    Passes over the output: one binary op for the first two taps (``out = x_a + x_b``, with small
    border copies where the second tap does not reach), one in-place add per further tap;
    ``alpha`` and ``base`` ride on the first pass (``out = base + alpha x_a``) or on a single
    extra pass when both are given.
    """
    axes = tuple(a % x.ndim for a in axes)
    if circular:
        x = wrap_pad(x, axes, lo, hi)
        lo = hi = 0
    length = x.shape[axes[0]]
    n_out = (length + lo + hi - f) // s + 1
    if n_out < 1:
        raise ValueError(f"a window of {f} does not fit {length} pixels (padding {lo}+{hi})")
    pieces = []
    for k in range(f):
        # output positions P with 0 <= P s + k - lo <= length - 1
        p0 = max(0, -((k - lo) // s))
        p1 = min(n_out - 1, (length - 1 + lo - k) // s)
        if p1 < p0:
            continue
        src0 = p0 * s + k - lo
        src = slice(src0, src0 + (p1 - p0) * s + 1, s)
        pieces.append((slice(p0, p1 + 1), src, p0 == 0 and p1 == n_out - 1))
    shape = list(x.shape)
    for a in axes:
        shape[a] = n_out
    nd = x.ndim
    full = [p for p in pieces if p[2]]
    has_base = base is not None and not (isinstance(base, (int, float)) and base == 0)
    if full:
        first = full[len(full) // 2]
        pieces.remove(first)
        xa = x[_index(nd, axes, first[1])]
        if has_base:  # out = base + alpha * x_a in one pass
            b = base if torch.is_tensor(base) else torch.tensor(float(base), dtype=x.dtype,
                                                                device=x.device)
            out = torch.add(b, xa, alpha=alpha)
            if tuple(out.shape) != tuple(shape):
                out = out.expand(shape).contiguous()
            alpha_rest = alpha
        elif alpha != 1.0:
            out = torch.mul(xa, alpha)
            alpha_rest = alpha
        elif pieces:  # out = x_a + x_b on b's region, x_a elsewhere (small border copies)
            dst, src, _ = pieces.pop(0)
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
            torch.add(xa[_index(nd, axes, dst)], x[_index(nd, axes, src)],
                      out=out[_index(nd, axes, dst)])
            for idx in _complement(nd, axes, dst, n_out):
                out[idx] = xa[idx]
            alpha_rest = 1.0
        else:
            out = xa.clone(memory_format=torch.contiguous_format)
            alpha_rest = 1.0
        for dst, src, _ in pieces:
            out[_index(nd, axes, dst)].add_(x[_index(nd, axes, src)], alpha=alpha_rest)
        return out
    out = x.new_zeros(shape)
    for dst, src, _ in pieces:
        out[_index(nd, axes, dst)].add_(x[_index(nd, axes, src)], alpha=alpha)
    if has_base:
        out.add_(base)
    return out


def _complement(ndim: int, axes: Sequence[int], dst: slice, n: int):
    """Index tuples covering the output positions where not all ``axes`` lie in ``dst``."""
    outside = [sl for sl in (slice(0, dst.start), slice(dst.stop, n)) if sl.stop > sl.start]
    done = [slice(None)] * ndim
    for a in axes:
        for sl in outside:
            idx = list(done)
            idx[a] = sl
            yield tuple(idx)
        done[a] = dst


def _index(ndim: int, axes: Sequence[int], sl: slice):
    idx = [slice(None)] * ndim
    for a in axes:
        idx[a] = sl
    return tuple(idx)


# Pixel-pair arrays larger than this are convolved a few batch entries at a time, so the
# stencil's intermediate (one per spatial dimension) and its passes stay in the last-level cache
# instead of streaming from DRAM (32x32 images: 8 MiB per entry in float64).
STENCIL_CHUNK_BYTES = 16 << 20


def conv_full(t: Tensor, batch_ndim: int, filt: Sequence[int], strides: Sequence[int],
              pads: Pads, circular: bool, alpha: float = 1.0, base=None) -> Tensor:
    """``base + alpha * (conv stencil sum)`` on the full layout ``(*batch, *S, *S)``.

    Separable: one joint-shift window sum per spatial dimension ``d`` over the axis pair
    ``(p_d, q_d)``, so a 3x3 filter costs 2 + 2 passes instead of 9 shifted adds. Large
    arrays go entry chunk by entry chunk (``STENCIL_CHUNK_BYTES``). 1-D/2-D on CPU: one fused
    pass instead (:mod:`ntkit.layers._fused`) when numba is installed."""
    fused = _fused_conv(t, batch_ndim, filt, strides, pads, circular, alpha, base, True)
    if fused is not None:
        return fused
    nb = prod(t.shape[:batch_ndim])
    per = t.numel() // max(nb, 1) * t.element_size()
    # (cache-sized chunks help CPUs only; an accelerator wants the largest ops)
    if batch_ndim and nb > 1 and t.numel() * t.element_size() > STENCIL_CHUNK_BYTES \
            and t.device.type == "cpu":
        flat = t.reshape((nb,) + tuple(t.shape[batch_ndim:]))
        fb = base.reshape((nb,) + tuple(base.shape[batch_ndim:])) \
            if torch.is_tensor(base) and base.ndim > 0 else base
        step = max(1, STENCIL_CHUNK_BYTES // max(per, 1))
        out = None
        for lo in range(0, nb, step):
            sl = slice(lo, min(lo + step, nb))
            piece = _conv_full(flat[sl], 1, filt, strides, pads, circular, alpha,
                               fb[sl] if torch.is_tensor(fb) and fb.ndim > 0 else fb)
            if out is None:
                out = piece.new_empty((nb,) + tuple(piece.shape[1:]))
            out[sl] = piece
            del piece
        assert out is not None  # nb > 1: the loop ran
        return out.reshape(tuple(t.shape[:batch_ndim]) + tuple(out.shape[1:]))
    return _conv_full(t, batch_ndim, filt, strides, pads, circular, alpha, base)


def _conv_full(t: Tensor, batch_ndim: int, filt: Sequence[int], strides: Sequence[int],
               pads: Pads, circular: bool, alpha: float = 1.0, base=None) -> Tensor:
    ns = len(filt)
    for d in range(ns):
        last = d == ns - 1
        t = window_sum(t, (batch_ndim + d, batch_ndim + ns + d), filt[d], strides[d], *pads[d],
                       circular, alpha if last else 1.0, base if last else None)
    return t


def conv_diag(t: Tensor, batch_ndim: int, filt: Sequence[int], strides: Sequence[int],
              pads: Pads, circular: bool, alpha: float = 1.0, base=None) -> Tensor:
    """``base + alpha * (conv stencil sum)`` on the diagonal layout ``(*batch, *S)``."""
    fused = _fused_conv(t, batch_ndim, filt, strides, pads, circular, alpha, base, False)
    if fused is not None:
        return fused
    ns = len(filt)
    for d in range(ns):
        last = d == ns - 1
        t = window_sum(t, (batch_ndim + d,), filt[d], strides[d], *pads[d], circular,
                       alpha if last else 1.0, base if last else None)
    return t


def _fused_conv(t, batch_ndim, filt, strides, pads, circular, alpha, base, full):
    """The fused single-pass stencil, or ``None`` where it does not apply."""
    if not _fused.conv_ok(filt, strides, pads, circular) or \
            not _fused.usable(t, base if torch.is_tensor(base) else None):
        return None
    return _fused.conv(t, batch_ndim, filt, pads, alpha, base, full)


def pool_full(t: Tensor, batch_ndim: int, window: Sequence[int], strides: Sequence[int],
              pads: Pads, circular: bool) -> Tensor:
    """Pooling (unnormalized sum) on the full layout: the two pixels move independently."""
    ns = len(window)
    for d in range(ns):
        for a in (batch_ndim + d, batch_ndim + ns + d):
            t = window_sum(t, (a,), window[d], strides[d], *pads[d], circular)
    return t


def pad_input(x: Tensor, pads: Pads, circular: bool) -> Tensor:
    """Pad a finite-network activation ``(N, C, *S)`` the way the kernel assumes."""
    if not any(lo or hi for lo, hi in pads):
        return x
    if circular:
        for d, (lo, hi) in enumerate(pads):
            x = wrap_pad(x, (2 + d,), lo, hi)
        return x
    flat = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    return torch.nn.functional.pad(x, flat)


def prod(xs) -> int:
    return int(math.prod(xs))


def fold(t: torch.Tensor, axis: int, size: int, lo: int) -> torch.Tensor:
    """Wrap ``axis`` around onto ``size`` entries: ``out[(p - lo) mod size] += t[p]``
    (how 'CIRCULAR' maps the 'VALID' transposed-conv output onto the 'SAME' shape)."""
    n = t.shape[axis]
    if n == size and lo == 0:
        return t
    shape = list(t.shape)
    shape[axis] = size
    idx = (torch.arange(n, device=t.device) - lo) % size
    return t.new_zeros(shape).index_add_(axis, idx, t)
