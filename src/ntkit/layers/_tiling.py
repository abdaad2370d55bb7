"""Tile-by-tile evaluation of an architecture's kernel under a memory budget.

The architecture is applied to blocks ``(x1[I], x2[J])``; every kernel entry depends only on its
two examples, so tiles are independent. When ``x2`` is ``None`` only tiles with ``I <= J`` are
computed and mirrored, and diagonal tiles keep an exact diagonal.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional, Tuple, cast

import torch

from .._settings import settings
from .._system import available_memory
from .._validation import parse_memory_budget
from ..kernel import Kernel
from ._calls import apply_kernel_map, slice_call_args, using_call_args
from ._masking import MASK_ARG
from . import _fc_chain
from ._numeric import known_finite, mark_finite
from ._ops import first_occurrence, has_duplicate_rows, input_kernel, self_memo, variances

# Working-set model. A layer's kernel map holds its input nngp/ntk, its outputs and the
# temporaries of a stencil pass or of an activation's dual map (product, sqrt, angle, dot):
# measured peak ~8 arrays of one tile (tests/layers/test_conv_memory.py); 12 leaves headroom
# for combinators (FanOut branches) and the result copy.
LIVE_ARRAYS = 12
# Tile edge cap for fully-connected kernels: ~0.5-2 MB temporaries stay cache-friendly.
FC_TILE_CAP = 768
# Cache-aware caps for spatial kernels: bytes of ONE array of a tile (entries x pixels
# (diagonal) or pixel pairs (full) x itemsize). Measured with `bench/bench_conv_kernel.py
# --sweep --threads 1` (2-core Xeon, 2 MiB L2 per core, 105 MiB L3, machine under load),
# 4 x [Conv 3x3 SAME + ReLU] on 16x16 images, ms per entry:
#   full (GAP, n=40; one entry = 512 KiB f64 / 256 KiB f32), tile 1/2/3/4/6/8:
#     f64 4.2/5.2/4.7/6.7/6.0/8.9, f32 3.6/2.07/2.06/2.6/3.2/3.4 -> ~1 MiB per array
#     (f64: 1x1 tiles, f32: 2x2); bigger tiles fall out of L2, 1x1 f32 tiles pay op overhead;
#   diag (Flatten, n=200; one entry = 2 KiB f64 / 1 KiB f32), tile 4/8/16/24/32/48/64:
#     f64 .056/.024/.028/.022/.021/.028/.032, f32 .051/.029/.021/.016/.015/.014/.019
#     -> ~2 MiB per array (f64: 32x32, f32: 45x45).
# With the fused numba kernels (one pass per map) the same caps were re-checked for GAP float32:
# tiles 2/4/8 gave 0.68-0.81 / 0.76-0.79 / 0.66-0.72 ms per entry (within run-to-run noise),
# tile 1 1.9 and tile 20 2.6 (per-call overhead / out of cache), so the caps stay.
# Re-measured on this project's current 2-core AMD EPYC (2 MiB L2 per core, 32 MiB L3), after
# the tiles were sized by the largest array inside the network (max_pixels: ConvTranspose /
# ImageResize upsample) and the tile memo covered every layer; 1 vs 3 (vs 4) MiB per full
# array, alternating in one process, medians: GAP 4 x Conv 16x16 (n=40) f32 1.08-1.21 ->
# 0.90-0.91 s, f64 2.91 -> 2.14 s; Flatten (n=200) f64 0.25-0.28 -> 0.23 s; the new-layer bench
# cases (`bench/bench_layers_vs_nt.py`) ConvTranspose 2x, Index / ConvLocal / ImageResize
# 1.5-2.4x, LayerNorm(C,H,W) 1.3x, attention 1.0-1.25x faster, none slower. 3 MiB keeps a
# 32x32 float32 pixel-pair entry (4 MiB) above the target (uncapped, as before).
# Re-measured 2026-12-03 on the 2-core Intel Xeon VM with ntkit's defaults in effect (OpenMP
# threads sleeping, OMP_WAIT_POLICY=PASSIVE, and ntkit._malloc's allocator thresholds): every
# op of a tile wakes the sleeping thread, so small tiles pay per-op wake-ups, not cache misses.
# Pixel-pair arrays of ~32 MiB won everywhere: GAP 4 x Conv 16x16 (n=40) float64 tile 2 (the
# 3 MiB cap) / 4 / 8 / 12 / 16: 10.6 / 5.7 / 3.9 s in one run and 4.0 / - / 2.5 / 2.7 / 3.0 s
# in another (the VM's speed drifts), float32 7.3 / 3.4 / 2.5 s; with spinning threads
# (NTKIT_OMP_PASSIVE=0) tile 8 still beat the old cap (2.3 vs 2.9 s); the attention case of
# bench/bench_layers_vs_nt.py (P = 24) float64 tile 26 (old cap) 213-316 ms, 96 (whole) 103 ms.
# An entry above SPATIAL_UNCAPPED_ABOVE (a 32x32 float32 pixel-pair entry is 4 MiB) stays
# uncapped, as measured before.
SPATIAL_TILE_BYTES = {"full": 32 << 20, "diag": 6 << 20}
SPATIAL_UNCAPPED_ABOVE = 3 << 20
# Share of the budget left after the output that the self-covariance memo may use (the rest
# is the tile's working set).
MEMO_SHARE = 0.25


class TileLimitReached(Exception):
    """Raised by :func:`evaluate` when ``ntkit.settings.tile_limit`` tiles are done
    (benchmarks: a huge kernel's total time is extrapolated from its first tiles under the
    real plan)."""

    def __init__(self, done: int, total: int, seconds: float, tile: int, times=(), pairs=()):
        super().__init__(f"stopped after {done} of {total} tiles ({seconds:.1f} s)")
        self.done, self.total, self.seconds, self.tile = done, total, seconds, tile
        self.times, self.pairs = list(times), list(pairs)  # per-tile seconds, all (i, j) tiles


def _gb(b: float) -> str:
    return f"{b / 2**30:.3g} GiB"


def kernel_tile(arch, xa: torch.Tensor, xb: Optional[torch.Tensor], want_ntk: bool,
                full_spatial: bool, cov_a: Optional[torch.Tensor] = None,
                cov_b: Optional[torch.Tensor] = None, call_args: Optional[dict] = None,
                duplicates: bool = True) -> Kernel:
    """Kernel of one tile; ``xb=None`` means the symmetric tile ``(xa, xa)``.

    ``cov_a`` / ``cov_b``: precomputed input self-covariances of the blocks (see
    :func:`ntkit.layers._ops.input_kernel`). ``call_args``: the call-time arguments of this
    tile's blocks (:func:`ntkit.layers._calls.slice_call_args`). ``duplicates=False``: no
    input row of the tile equals another (checked once for all tiles by the caller)."""
    k = input_kernel(xa, xb, want_ntk, full_spatial, cov_a, cov_b, duplicates=duplicates)
    if call_args:
        masks = call_args.get(MASK_ARG)
        if masks is not None:  # mask_constant: position masks of the two blocks
            k = k.replace(mask1=masks[0], mask2=None if xb is None else masks[1])
    with using_call_args(call_args):
        k = apply_kernel_map(arch, k)
    if isinstance(k, tuple):
        raise ValueError("the architecture ends in several branches; merge them with FanInSum() or "
                         "FanInConcat() before the end")
    if want_ntk and k.ntk is None:
        k = k.replace(ntk=torch.zeros_like(k.nngp))
    return k


def _pixels(shape) -> int:
    """Positions of one per-example shape ``(C, *S)`` (the largest of several branches)."""
    if isinstance(shape, tuple) and shape and all(isinstance(v, int) for v in shape):
        return math.prod(shape[1:]) if len(shape) > 1 else 1
    if isinstance(shape, (tuple, list)) and shape:
        return max(_pixels(s) for s in shape)
    return 1


def max_pixels(arch, in_shape: Tuple[int, ...]) -> int:
    """The largest number of positions of any value inside ``arch`` for inputs of per-example
    shape ``in_shape`` (``Layer.inner_shapes``): a ConvTranspose or an upsampling ImageResize
    makes the arrays after it larger than the inputs', and tiles sized by the inputs overran
    both the caches and ``memory_budget`` there."""
    best = _pixels(in_shape)
    try:
        shapes = arch.inner_shapes(in_shape)
    except Exception:  # let the kernel map report what does not fit, with its own message
        return best
    return max([best] + [_pixels(s) for s in shapes])


def per_entry_bytes(pix: int, full: bool, itemsize: int) -> int:
    """Working-set bytes per kernel entry of a tile: ``LIVE_ARRAYS`` arrays of ``pix`` (diagonal
    layout) or ``pix^2`` (full pixel-pair layout) numbers."""
    return LIVE_ARRAYS * itemsize * (pix * pix if full else pix)


def cache_cap(pix: int, full: bool, itemsize: int) -> Optional[int]:
    """Tile edge whose single arrays stay near the measured cache sweet spot, or ``None`` (no
    cap) when one entry alone is already larger than that: then the ops stream from memory
    whatever the tile, and bigger tiles amortize the blocks' self-covariances better."""
    one = itemsize * (pix * pix if full else pix)
    target = SPATIAL_TILE_BYTES["full" if full else "diag"]
    if one > min(target, SPATIAL_UNCAPPED_ABOVE):
        return None
    return max(1, int(math.sqrt(target / one)))


def plan_tile(n1: int, n2: int, per_entry_bytes: float, out_entry_bytes: float, budget: int,
              fc: bool, tile: Optional[int], cap: Optional[int] = None,
              self_bytes: float = 0.0) -> int:
    """Examples per tile edge so that the output plus one tile's working set fit ``budget``.

    ``self_bytes``: working set of the per-example self-covariances one tile edge carries
    (``b`` of them for each of the two blocks). Raises ``MemoryError`` naming a budget that
    would fit when not even a 1 x 1 tile does.
    """
    out_bytes = n1 * n2 * out_entry_bytes
    if out_bytes > budget:
        raise MemoryError(
            f"the requested kernel alone needs {_gb(out_bytes)} ({n1} x {n2} entries x "
            f"{out_entry_bytes:.0f} B) but memory_budget is {_gb(budget)}; compute it in pieces "
            f"with ntkit.compute_kernel(..., store='k.zarr') or raise memory_budget")
    room = budget - out_bytes

    def need(b):
        return b * b * per_entry_bytes + 2 * b * self_bytes

    if need(1) > room:
        raise MemoryError(
            f"one kernel entry needs {_gb(need(1))} of working memory ({per_entry_bytes:.0f} B "
            f"per entry + {2 * self_bytes:.0f} B of self-covariances) but only {_gb(room)} of "
            f"memory_budget={_gb(budget)} is left after the {_gb(out_bytes)} output; a budget of "
            f"at least {_gb(out_bytes + need(1))} would fit (or ask for fewer examples at once)")
    if tile is not None:
        if tile < 1:
            raise ValueError(f"`tile` must be a positive integer, got {tile}")
        if need(min(tile, max(n1, n2))) > room:
            fit = int(math.sqrt(room / (per_entry_bytes + 2 * self_bytes)))
            raise MemoryError(
                f"tile={tile} needs {_gb(need(tile))} of working memory but memory_budget="
                f"{_gb(budget)} leaves {_gb(room)} after the output; tile <= {max(fit, 1)} fits")
        return int(tile)
    # largest b with b^2 per_entry + 2 b self_bytes <= room
    b = int((-self_bytes + math.sqrt(self_bytes ** 2 + per_entry_bytes * room)) / per_entry_bytes)
    while b > 1 and need(b) > room:
        b -= 1
    if fc:
        b = min(b, FC_TILE_CAP)
    if cap is not None:
        b = min(b, cap)
    return max(1, min(b, max(n1, n2)))


@contextlib.contextmanager
def _direct_mmap(active: bool):
    """While active (spatial kernels whose single arrays are >= 1 MiB): glibc serves blocks of
    1 MiB and more by ``mmap`` and unmaps them on free. Its default threshold adapts upwards
    (to 32 MiB) after the first large free, after which freed pixel-pair arrays stay resident
    and fragment: measured RSS up to 2.2x the live working set (test_conv_memory.py). The
    threshold is put back to glibc's adaptive ceiling (32 MiB) afterwards. No-op elsewhere."""
    fn = None
    if active:
        try:
            import ctypes
            fn = ctypes.CDLL("libc.so.6").mallopt
            fn.argtypes = [ctypes.c_int, ctypes.c_int]
            fn(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            fn = None
    try:
        yield
    finally:
        if fn is not None:
            fn(_M_MMAP_THRESHOLD, 32 << 20)


_M_MMAP_THRESHOLD = -3


def _mirror(t: torch.Tensor, ns: int, diagonal_spatial: bool) -> torch.Tensor:
    """The tile for ``(x2, x1)`` from the tile for ``(x1, x2)``."""
    t = t.transpose(0, 1)
    if ns and not diagonal_spatial and t.ndim == 2 + 2 * ns:
        perm = [0, 1] + list(range(2 + ns, 2 + 2 * ns)) + list(range(2, 2 + ns))
        t = t.permute(perm)
    return t


def _symmetric(t: torch.Tensor, ns: int, diagonal_spatial: bool,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A symmetric tile made exactly symmetric: a matrix product need not be (BLAS rounds
    ``x_i . x_j`` and ``x_j . x_i`` differently), vectorized elementwise maps round the same
    input differently in the vector body and the scalar tail, and pooling sums the (p, q) and
    (q, p) halves of the pixel-pair covariance in different orders, so ``K(x, x')`` and
    ``K(x', x)`` can differ in the last bit. ``0.5 a + 0.5 b`` (not ``0.5 (a + b)``, which
    overflows near the largest float) leaves equal entries bitwise unchanged. ``out``: write
    the result there (a slice of the assembled output) instead of a fresh tensor."""
    finite = out is None and known_finite(t)
    m = _mirror(t, ns, diagonal_spatial)
    m = torch.mul(m, 0.5, out=out) if out is not None else \
        m.clone(memory_format=torch.contiguous_format).mul_(0.5)
    m = m.add_(t, alpha=0.5)
    return mark_finite(m) if finite else m   # (averages of finite numbers cannot overflow)


def evaluate(arch, x1: torch.Tensor, x2: Optional[torch.Tensor], keys: Tuple[str, ...],
             single: bool, memory_budget: Optional[int] = None, progress: bool = False,
             tile: Optional[int] = None, call_args: Optional[dict] = None):
    """Evaluate ``arch``'s kernel between ``x1`` and ``x2`` (see ``Layer.kernel``).

    ``call_args``: ``name -> (a1, a2 or None)`` per-example call-time arguments (see
    :func:`ntkit.layers._base.prepare_call_args`), sliced with the tiles' rows and columns.

    Plan: the output (``n1 n2`` entries x output tail x keys) plus one tile's working set
    (:func:`per_entry_bytes` per entry, plus the blocks' self-covariances) must fit the
    budget; spatial tiles are further capped by :func:`cache_cap`. A quarter of what is left
    after the output and the tile may hold a memo of the blocks' per-layer self-covariances
    (:class:`ntkit.layers._ops.SelfMemo`), so each is computed once instead of once per tile.
    """
    want_ntk = "ntk" in keys
    out_shape = check_output_shape(arch, tuple(x1.shape[1:]))
    full = bool(x1.ndim > 2 and arch.needs_full_spatial(False))
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    itemsize = x1.element_size()
    budget = parse_memory_budget(memory_budget)
    # tiles live on the inputs' device: a CUDA kernel is bounded by that GPU's free memory
    budget = budget if budget is not None else available_memory(x1.device) // 2
    if n1 == 0 or n2 == 0:
        return _empty(arch, x1, x2, keys, single, want_ntk, full, out_shape, call_args)

    ns = x1.ndim - 2
    pix = max_pixels(arch, tuple(x1.shape[1:])) if ns else 1
    # A budget that cannot hold even a 1 x 1 tile fails here, before any work; then a 1 x 1
    # probe gives the output layout and the tiles are sized.
    per_entry = per_entry_bytes(pix, full, itemsize)
    self_bytes = per_entry / 2 if ns else 0.0  # a block's self-covariance chain, per example
    plan_tile(1, 1, per_entry, 0, budget, fc=(ns == 0), tile=None, self_bytes=self_bytes)
    big_arrays = bool(ns) and itemsize * (pix * pix if full else pix) >= 1 << 20 \
        and x1.device.type == "cpu"  # glibc's allocator serves only host memory
    # Bitwise-equal input rows get bitwise-equal kernel entries (see input_kernel); one search
    # over all rows here instead of one per tile: usually there are none, and every tile and
    # the final pass skip the search (40 ms of 600 for a 4000-row FC kernel in 22 tiles).
    dups = has_duplicate_rows(x1, x2)
    with _direct_mmap(big_arrays):
        k = _evaluate(arch, x1, x2, keys, want_ntk, budget, progress, tile, full, per_entry,
                      self_bytes, call_args, dups, pix)
    # Equal inputs with different call-time arguments (graphs) may differ, and under per-pass
    # noise (train-mode Dropout) two copies of an input in one batch are different examples.
    if dups and not call_args and not _per_pass_noise(arch):
        _dedupe(k, keys, x1, x2)
    check_representable(k, keys, x1)
    return _finish(k, keys, single)


def _is_fully_connected(layer) -> bool:
    """Whether every layer of the architecture is one that acts on the channel axis only
    (Dense, activations, LayerNorm, combinators of them: their classes set
    ``fully_connected``): no Conv, pooling or Flatten."""
    return all(sub.fully_connected for sub in layer.walk())


def check_output_shape(arch, in_shape: Tuple[int, ...]):
    """The architecture's per-example output shape (``None`` when it cannot tell: branches).

    Refuses a fully-connected architecture (no Conv, pooling or Flatten) applied to spatial
    inputs ``(n, C, *S)``: Dense acts on the channel axis of every pixel, so its "kernel"
    would be ``(n1, n2, *S)`` per-pixel kernels, almost surely not what was meant. (A
    convolutional architecture without a readout keeps its documented per-pixel kernels.)"""
    if len(in_shape) > 1 and _is_fully_connected(arch):
        out = arch.out_shape(in_shape)
        raise ValueError(
            f"the architecture is fully connected (no Conv, pooling or Flatten layer) but the "
            f"inputs have per-example shape {in_shape} (channels first, then spatial axes): "
            f"Dense would act on the channel axis of each pixel, giving per-pixel outputs "
            f"{out} and an (n1, n2, {', '.join(map(str, in_shape[1:]))}) array of per-pixel "
            f"kernels instead of the (n1, n2) kernel. Flatten the data with x.flatten(1) (or "
            f"start the architecture with Flatten()) for a fully-connected network on all "
            f"{math.prod(in_shape)} features, or use Conv layers for a CNN")
    try:
        return arch.out_shape(in_shape)
    except Exception:  # let the kernel map report what does not fit, with its own message
        return None


def _empty(arch, x1, x2, keys, single, want_ntk, full, out_shape, call_args=None):
    """The kernel between ``x1`` and ``x2`` when either has no rows: empty ``(n1, n2)``
    arrays (``(n1, n2, *S)`` for per-pixel kernels). The architecture is still run on one
    example when one is available, so one that does not fit the data fails as with rows."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    probe_x = x1 if n1 or x2 is None else x2
    like = dict(dtype=x1.dtype, device=x1.device)
    if probe_x.shape[0]:
        if call_args and probe_x is not x1:  # x1 is empty: probe with x2's arguments
            call_args = {n: (a2, None) for n, (_, a2) in call_args.items()}
        probe = kernel_tile(arch, probe_x[:1], None, want_ntk, full,
                            call_args=slice_call_args(call_args, slice(0, 1)))
        shape, tail = probe.shape1, tuple(probe.nngp.shape[2:])
        cov_tail = tuple(probe.cov1.shape[1:])
    else:
        shape = tuple(out_shape) if isinstance(out_shape, tuple) else tuple(x1.shape[1:])
        sp = tuple(shape[1:]) if all(isinstance(s, int) for s in shape) else ()
        tail = sp + sp if full else sp
        cov_tail = tail
    k = Kernel(nngp=torch.empty((n1, n2) + tail, **like),
               ntk=torch.empty((n1, n2) + tail, **like),
               cov1=torch.empty((n1,) + cov_tail, **like),
               cov2=None if x2 is None else torch.empty((n2,) + cov_tail, **like),
               shape1=shape, shape2=shape, want_ntk=want_ntk)
    return _finish(k, keys, single)


def _per_pass_noise(layer) -> bool:
    """Whether any layer's kernel depends on which examples share a forward pass."""
    return any(getattr(sub, "per_pass_noise", False) for sub in layer.walk())


def _dedupe(k: Kernel, keys, x1: torch.Tensor, x2: Optional[torch.Tensor]) -> None:
    """In place: rows (and columns) of bitwise-identical examples made bitwise identical.

    The recursion already maps identical inputs to equal values (exact input covariances and
    snapped correlations, see :mod:`ntkit.layers._ops`), but their self-covariances may be
    rounded differently by a vectorized loop's body and tail; copying the first occurrence
    makes ``K(x, x') == K(x, x) == K(x', x')`` exact."""
    r1 = first_occurrence(x1)
    r2 = r1 if x2 is None else first_occurrence(x2)
    for key in keys:
        t = getattr(k, key)
        for rep, dim in ((r1, 0), (r2, 1)):
            if rep is None:
                continue
            idx = (rep != torch.arange(rep.shape[0], device=rep.device)).nonzero().flatten()
            if dim == 0:
                t[idx] = t[rep[idx]]
            else:
                t[:, idx] = t[:, rep[idx]]
    for cov, rep in ((k.cov1, r1), (k.cov2, r2 if x2 is not None else None)):
        if cov is not None and rep is not None:
            idx = (rep != torch.arange(rep.shape[0], device=rep.device)).nonzero().flatten()
            cov[idx] = cov[rep[idx]]


def check_representable(k: Kernel, keys, x: torch.Tensor) -> None:
    """Raise instead of returning a kernel that over- or underflowed ``x``'s dtype.

    Overflow: any non-finite entry (inputs are finite, so ``inf``/``NaN`` only come from
    values beyond the dtype's range). Underflow: a positive variance (the kernel's diagonal)
    below the smallest normal number has lost its relative precision (bias-free networks scale
    like a power of the input norm). Intermediate values never over/underflow where the result
    is representable (normalized dual maps, scaled input products), so this is exactly the
    case "the kernel is not representable"."""
    info = torch.finfo(x.dtype)
    name = "float32" if x.dtype == torch.float32 else "float64"
    hint64 = " or compute in float64 (dtype=torch.float64)" if x.dtype == torch.float32 else ""
    for key in keys:
        t = getattr(k, key)
        if t is not None and t.numel() and not known_finite(t) and \
                not all(math.isfinite(float(m)) for m in torch.aminmax(t)):
            raise ValueError(
                f"the {key.upper()} overflows {name} (entries beyond {info.max:.3g}); the "
                f"kernel scales with the input norm (largest |x| = {float(x.abs().max()):.3g}) "
                f"and with W_std**2 per layer: rescale the inputs, reduce W_std or the depth"
                f"{hint64}")
    covs = [variances(c, k) for c in (k.cov1, k.cov2) if c is not None and c.numel()]
    for c in covs:
        pos = c[c > 0]
        if pos.numel() and float(pos.min()) < info.tiny:
            raise ValueError(
                f"the kernel underflows {name}: variances as small as {float(pos.min()):.3g} "
                f"are below the smallest normal number {info.tiny:.3g} and have lost their "
                f"precision; rescale the inputs up (largest |x| = {float(x.abs().max()):.3g}; "
                f"a bias-free network's kernel scales like a power of the input norm){hint64}")


def _evaluate(arch, x1, x2, keys, want_ntk, budget, progress, tile, full, per_entry,
              self_bytes, call_args, dups: bool, pix: int) -> Kernel:
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    itemsize = x1.element_size()
    ns = x1.ndim - 2

    def run_probe():
        p = kernel_tile(arch, x1[:1], None, want_ntk, full,
                        call_args=slice_call_args(call_args, slice(0, 1)), duplicates=False)
        # a tile always carries the NNGP and the x1 self-covariance (only _finish drops them)
        assert p.nngp is not None and p.cov1 is not None
        return p
    # Fully-connected inputs (n, d) give (n1, n2) kernels: the 1 x 1 probe (which finds the
    # output layout) is only needed once there are tiles to assemble
    probe = run_probe() if ns else None
    out_tail = tuple(probe.nngp.shape[2:]) if probe is not None else ()
    out_entry = itemsize * max(1, math.prod(out_tail)) * len(keys)
    # The caps keep a tile's arrays in a CPU's caches; an accelerator wants the largest tiles
    # its memory budget allows (more parallel work per op, fewer launches).
    cpu = x1.device.type == "cpu"
    cap = cache_cap(pix, full, itemsize) if ns and cpu else None
    # A cross kernel that is one fused FC run per tile needs no cache cap (a symmetric one keeps
    # it: its tiles below the diagonal are mirrored, not computed)
    fc_cap = ns == 0 and cpu and not (x2 is not None and _fc_chain.covers(arch, x1))
    b = plan_tile(n1, n2, per_entry, out_entry, budget, fc=fc_cap, tile=tile,
                  cap=cap, self_bytes=self_bytes)

    if b >= n1 and b >= n2:
        k = kernel_tile(arch, x1, x2, want_ntk, full, call_args=slice_call_args(
            call_args, slice(None), None if x2 is None else slice(None)), duplicates=dups)
        if x2 is None:
            k = k.replace(**{key: _symmetric(getattr(k, key), len(k.shape1) - 1,
                                             k.diagonal_spatial) for key in keys})
        return k

    if probe is None:
        probe = run_probe()
        if tuple(probe.nngp.shape[2:]) != out_tail:   # (a layer made FC inputs spatial)
            out_tail = tuple(probe.nngp.shape[2:])
            out_entry = itemsize * max(1, math.prod(out_tail)) * len(keys)
            b = plan_tile(n1, n2, per_entry, out_entry, budget, fc=fc_cap, tile=tile,
                          cap=cap, self_bytes=self_bytes)
    room = budget - n1 * n2 * out_entry - b * b * per_entry - 2 * b * self_bytes
    like = dict(dtype=x1.dtype, device=x1.device)
    out = {key: torch.empty((n1, n2) + out_tail, **like) for key in keys}
    cov1 = torch.empty((n1,) + tuple(probe.cov1.shape[1:]), **like)
    cov2 = None if x2 is None else torch.empty((n2,) + tuple(probe.cov1.shape[1:]), **like)
    rows = [slice(i, min(i + b, n1)) for i in range(0, n1, b)]
    cols = rows if x2 is None else [slice(j, min(j + b, n2)) for j in range(0, n2, b)]
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols))
             if x2 is not None or j >= i]
    from tqdm.auto import tqdm
    diag_sp = probe.diagonal_spatial
    out_ns = len(probe.shape1) - 1
    xb_all = x1 if x2 is None else x2
    limit = settings.tile_limit
    t0 = time.perf_counter()
    stamps = []
    with self_memo(max(0, int(room * MEMO_SHARE)) if ns else 0) as memo:

        def in_cov(side, idx, x):  # the same input self-covariance object for a block's tiles
            return memo.lookup(("input", side, idx), x, lambda x_: input_kernel(
                x_, None, False, full, duplicates=False).cov1, keep_input=False)

        bar = tqdm(pairs, desc=f"kernel tiles ({b}x{b})", disable=not progress, leave=False,
                   unit="tile")
        for done, (i, j) in enumerate(bar):
            if limit is not None and done >= limit:
                bar.close()
                stamps.append(time.perf_counter())
                raise TileLimitReached(done, len(pairs), time.perf_counter() - t0, b,
                                       [t - s for s, t in zip(stamps, stamps[1:])], pairs)
            stamps.append(time.perf_counter())
            I, J = rows[i], cols[j]
            ca = in_cov(0, i, x1[I]) if ns else None
            if x2 is None and i == j:
                kt = kernel_tile(arch, x1[I], None, want_ntk, full, ca,
                                 call_args=slice_call_args(call_args, I), duplicates=dups)
                cov1[I] = cast(torch.Tensor, kt.cov1)
            else:
                cb = in_cov(0 if x2 is None else 1, j, xb_all[J]) if ns else None
                kt = kernel_tile(arch, x1[I], xb_all[J], want_ntk, full, ca, cb,
                                 call_args=slice_call_args(call_args, I, J), duplicates=dups)
                if x2 is not None:
                    assert cov2 is not None  # allocated when x2 is given
                    if j == 0:
                        cov1[I] = cast(torch.Tensor, kt.cov1)
                    if i == 0:
                        cov2[J] = cast(torch.Tensor, kt.cov2)
            for key in keys:
                t = getattr(kt, key)
                if x2 is None and i == j:
                    _symmetric(t, out_ns, diag_sp, out=out[key][I, J])
                    continue
                out[key][I, J] = t
                if x2 is None:
                    out[key][J, I] = _mirror(t, out_ns, diag_sp)
            del kt
    return probe.replace(nngp=out.get("nngp"), ntk=out.get("ntk"), cov1=cov1, cov2=cov2,
                         shape2=probe.shape1 if x2 is None else probe.shape2)


def _finish(k: Kernel, keys, single: bool):
    if single:
        return getattr(k, keys[0])
    if "nngp" not in keys:
        k = k.replace(nngp=None)
    if "ntk" not in keys:
        k = k.replace(ntk=None)
    return k
