"""Runs of fully-connected layers as one fused pass per tile.

Why: after the input Gram matrix, a fully-connected kernel's recursion is elementwise given
per-example variances, so ``Dense -> Relu -> Dense -> Relu -> Dense`` need not cost a pass (and
fresh tile-sized arrays) per operation: :func:`ntkit.layers._fused.fc_chain` takes each row of
the tile through every layer while it sits in L1. ``Serial.kernel_map`` hands a maximal run of
such layers here (:func:`run_length`); everything else, and every tile without numba, keeps the
layers' own kernel maps, which are also the reference this path is tested against
(``tests/layers/test_fc_chain.py``).

A layer joins a run through :meth:`ntkit.layers.Layer.chain_stage` (Dense, the arc-cosine
family, ExpNormalized, Gabor; Identity and noise-free Dropout as identities) and supplies its per-example self-covariance step through
:meth:`ntkit.layers.Layer.chain_self` (the tile memo's key of its own kernel map). The batch
diagonal of a symmetric tile is set afterwards from the one-point maps, as the layers do.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..kernel import Kernel
from . import _fused
from ._numeric import inv_sqrt, known_finite, mark_finite
from ._ops import batch_diag, set_batch_diag

Tensor = torch.Tensor


def run_length(layers: Sequence[Any], i: int, k: Any) -> int:
    """How many layers from ``layers[i]`` on form a fused run for the record ``k`` (0: none):
    a fully-connected CPU float32/float64 kernel without masks, the fused kernels enabled, at
    least two layers with an activation among them, each activation after a Dense layer (or
    first, on Gaussian inputs; otherwise the run stops there and the layer's own map raises)."""
    if not isinstance(k, Kernel) or k.mask1 is not None or k.n_spatial or k.nngp is None \
            or k.nngp.ndim != 2 or k.cov1 is None:
        return 0
    if not _fused.usable(k.nngp, k.ntk, k.cov1, k.cov2):
        return 0
    gauss, j, acts, shape = k.is_gaussian, i, 0, k.shape1
    dt = k.nngp.dtype
    while j < len(layers):
        st = layers[j].chain_stage(shape, dt)
        if st is None:
            break
        if st[0] < 0:      # an identity (Identity, Dropout without per-pass noise)
            pass
        elif st[0]:
            if not gauss:
                break
            gauss = False
            acts += 1
        else:
            gauss = True
        shape = layers[j].out_shape(shape)
        j += 1
    return j - i if acts and j - i >= 2 else 0


def covers(arch: Any, x: Tensor) -> bool:
    """Whether ``arch`` on inputs like ``x`` (CPU float32/float64, fused kernels enabled) is a
    ``serial`` of stages only, i.e. one fused run per tile: its tiles then need no cache-sized
    cap (the run keeps one row in L1 whatever the tile; a bigger tile is one larger GEMM and
    no copy into the output)."""
    layers = getattr(arch, "layers", None)
    if not layers or x.ndim != 2 or not _fused.usable(x):
        return False
    shape: Any = tuple(x.shape[1:])
    try:
        for layer in layers:
            if layer.chain_stage(shape, x.dtype) is None:
                return False
            shape = layer.out_shape(shape)
    except (ValueError, TypeError):  # (the layer's own map will raise it)
        return False
    return True


def _set_diag(t: Tensor, values: Tensor) -> None:
    """:func:`set_batch_diag`, keeping a fused run's finiteness mark when ``values`` are finite."""
    was = known_finite(t)
    set_batch_diag(t, values)
    if was and bool(torch.isfinite(values).all()):
        mark_finite(t)


def _root_pair(v: Tensor) -> Tuple[Tensor, Tensor]:
    return inv_sqrt(v), v.sqrt()


def apply_run(layers: Sequence[Any], k: Kernel) -> Kernel:
    """``k`` through ``layers`` (a run accepted by :func:`run_length`) in one fused pass."""
    assert k.nngp is not None and k.cov1 is not None  # (run_length admits only such records)
    dt = k.nngp.dtype
    sym = k.cov2 is None
    want = k.want_ntk
    stages: List[Tuple[int, Tuple[float, ...]]] = []
    per1: List[Tuple[Tensor, ...]] = []
    per2: List[Tuple[Tensor, ...]] = []
    c1: Tensor = k.cov1
    c2: Optional[Tensor] = k.cov2
    # the exact batch diagonal of the NTK of a symmetric tile, through the same vector
    # arithmetic as the layers' own maps (None: identically zero)
    td: Optional[Tensor] = batch_diag(k.ntk) if sym and want and k.ntk is not None else None
    shape1, shape2 = k.shape1, k.shape2
    rec = k
    for layer in layers:
        code, nums = layer.chain_stage(shape1, dt)
        if code < 0:  # identity
            continue
        stages.append((code, nums))
        if code == 0:
            w2, b2, standard, width, bias = nums
            n1, _ = layer.chain_self(c1, rec)
            n2 = None if c2 is None else layer.chain_self(c2, rec)[0]
            if sym and want:
                if standard:
                    t = c1 * width
                    if td is not None:
                        t.add_(td, alpha=w2)
                    if bias:
                        t.add_(1.0)
                    td = t
                else:
                    td = n1.clone() if td is None else torch.add(n1, td, alpha=w2)
            c1, c2 = n1, n2
        else:
            v1, v2 = c1, (c1 if c2 is None else c2)
            per = _fused.gabor_per_example if code == 3 else _root_pair
            a = per(v1)
            per1.append(a)
            per2.append(a if v2 is v1 else per(v2))
            n1, dot1 = layer.chain_self(c1, rec)
            n2 = None if c2 is None else layer.chain_self(c2, rec)[0]
            if td is not None:
                td = td * dot1
            c1, c2 = n1, n2
        shape1, shape2 = layer.out_shape(shape1), layer.out_shape(shape2)
        rec = rec.replace(cov1=c1, cov2=c2, shape1=shape1, shape2=shape2)
    nngp, ntk = _fused.fc_chain(k.nngp, k.ntk, want, stages, per1, per2)
    if sym:
        _set_diag(nngp, c1)
        if ntk is not None and td is not None:
            _set_diag(ntk, td)
    is_gaussian = stages[-1][0] == 0
    return k.replace(nngp=nngp, ntk=ntk, cov1=c1, cov2=c2, shape1=shape1, shape2=shape2,
                     is_gaussian=is_gaussian)
