"""Random feature maps of an architecture: ``phi(x1) @ phi(x2).T ~= arch.kernel(x1, x2)``.

The map is the architecture's own finite network, drawn with Gaussian weights of width ``dim``
(NTK parameterization), plus a *tangent* copy that carries the NTK. Per example and pixel we keep

* ``phi``: features whose inner products estimate the NNGP of that point of the network;
* ``psi``: features whose inner products estimate the NTK (``None`` while the NTK is zero).

Layer by layer (``K`` the NNGP, ``T`` the NTK, ``W``/``b`` the layer's ``W_std``/``b_std``):

* Dense/Conv followed by an activation: ``z = G u`` with ``u = [W patch(phi), b]`` and a fresh
  Gaussian ``G`` (a random convolution for Conv): each of the ``dim`` channels of ``z`` is an exact
  ``N(0, K')`` sample, jointly over examples and pixels. The tangent is ``t = G' [u, W patch(psi)]``
  with an independent ``G'``, so ``E<t, t'> / dim = K' + W^2 T`` (the NTK recursion).
* Activation ``sigma``: ``phi' = sigma(z) / sqrt(dim)`` (``E<phi', phi''> = E sigma(u) sigma(v)``,
  the dual map) and ``psi' = sigma'(z) * t / sqrt(dim)``; since ``t`` is independent of ``z``,
  ``E<psi', psi''> = E[sigma'(u) sigma'(v)] (K' + W^2 T)`` -- the NTK's activation step.
  An activation whose input is not such a Gaussian sample draws its own ``G`` first.
* Dense not followed by an activation (the readout): exact, ``phi' = [W phi, b]``,
  ``psi' = [phi', W psi]`` -- no sampling noise at the top.
* Pooling, GlobalAvgPool, Flatten (``/ sqrt(pixels)``), FanInSum/FanInConcat (concatenation):
  exact linear maps of the features; LayerNorm (any axes): division by the estimated norm.
* Parameter-free linear maps of the spatial axes, ``y = L x`` (ImageResize, Index, DotGeneral,
  Aggregate with the chunk's ``pattern``): ``K' = L K L^T`` for the NNGP and the NTK, so
  ``phi' = L phi``, ``psi' = L psi`` exactly (the layer's own module, applied per column).
  ``Dropout(mode='test')`` and ``repeat`` (a serial of fresh copies) need nothing new.
* ConvTranspose / ConvLocal: a random transposed convolution / a random locally connected
  layer of width ``dim`` (independent filters per output pixel), as Conv.
* FanInProd: the branches as independent Gaussian samples ``z_i`` (drawn where they are not),
  ``phi' = prod_i z_i / sqrt(dim)``, ``psi' = concat_i [t_i prod_{j != i} z_j] / sqrt(dim)``.

Every step is unbiased given the layer below, so a one-hidden-layer network's features are
unbiased; deeper ones carry an ``O(1/dim)`` bias from the nonlinear dual maps (smaller than the
``O(dim^-1/2)`` spread). Cost is that of two forward passes of the width-``dim`` network: linear in
the number of pixels, no pixel-pair covariances. Any activation with a torch ``fn`` works (its
derivative by autograd). Not covered (refused by name, pointing to ``method='jacobian'``):
standard parameterization, ``GlobalSelfAttention`` (its attention weights are a nonlinear
function of each example's pixel-pair covariance), ``Dropout(mode='train')`` (a one-pass kernel
no fixed map reproduces), masks (``mask_constant``).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch

from .._system import available_memory
from .._validation import as_tensor, check_int, parse_get, parse_memory_budget
from ._base import Layer, prepare_call_args, using_call_args
from .activations import Activation
from .attention import GlobalSelfAttention
from .combinators import (FanInConcat, FanInProd, FanInSum, FanOut, Identity, Parallel,
                          Serial)
from .conv import Conv
from .conv_variants import ConvLocal, ConvTranspose, ImageResize
from .dense import Dense
from .graph import Aggregate
from .misc import DotGeneral, DotGeneralModule, Dropout, Index
from .normalization import LayerNorm, LayerNormAxes
from .pooling import Flatten, _GlobalPool, _Pool
from . import _stencil as st

__all__ = ["features", "feature_dim"]

Tensor = torch.Tensor


class _F:
    """Features of a batch at one point of the network.

    ``fresh=False``: ``K ~= sum_c phi phi'`` (channel axis 1). ``fresh=True``: every channel is an
    independent ``N(0, K)`` sample, ``K ~= mean_c phi phi'`` (and ``psi`` likewise, independent
    of ``phi``)."""
    __slots__ = ("phi", "psi", "fresh")

    def __init__(self, phi: Tensor, psi: Optional[Tensor], fresh: bool):
        self.phi, self.psi, self.fresh = phi, psi, fresh

    def normed(self) -> "_F":
        if not self.fresh:
            return self
        s = 1.0 / math.sqrt(self.phi.shape[1])
        return _F(self.phi * s, None if self.psi is None else self.psi * s, False)


class _Ctx:
    def __init__(self, dim: int, seed: int, want_ntk: bool):
        self.dim, self.seed, self.want_ntk = dim, seed, want_ntk
        self.n_ops = 0

    def next_id(self) -> int:
        self.n_ops += 1
        return self.n_ops


def _gen(seed: int, op_id: int, part: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + op_id * 101 + part) % (2 ** 63))
    return g


def _randn(shape, seed, op_id, part, like: Tensor) -> Tensor:
    """Gaussian weights drawn on the CPU from (seed, op, part), then moved: the same numbers on
    every device and for every chunk of examples. (Orthogonal random features were tried: no
    measurable gain here, and a QR per layer that dominated the cost at large ``dim``.)"""
    return torch.randn(shape, generator=_gen(seed, op_id, part), dtype=torch.float64,
                       device="cpu").to(dtype=like.dtype, device=like.device)


def _chan_mix(w: Tensor, x: Tensor) -> Tensor:
    """``(m, c) x (n, c, *S) -> (n, m, *S)``."""
    if x.ndim == 2:
        return x @ w.T
    return torch.einsum("mc,nc...->nm...", w, x)


def _bias_like(h: Tensor, ref: Tensor) -> Tensor:
    return h.reshape((1, -1) + (1,) * (ref.ndim - 2))


class _Op:
    def __call__(self, f):  # pragma: no cover - abstract
        raise NotImplementedError


class _Seq(_Op):
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, f):
        for op in self.ops:
            f = op(f)
        return f


class _DenseOp(_Op):
    def __init__(self, layer: Union[Dense, Conv], ctx: _Ctx, project: bool):
        self.w, self.b = layer.W_std, (layer.b_std or 0.0)
        self.project, self.ctx, self.id = project, ctx, ctx.next_id()
        self.weights: Dict[Tuple, Tensor] = {}

    def _draw(self, part, shape, like):
        key = (part, shape, like.dtype, like.device)
        if key not in self.weights:
            self.weights[key] = _randn(shape, self.ctx.seed, self.id, part, like)
        return self.weights[key]

    def _sample(self, phi: Tensor, psi: Optional[Tensor], lin, bias=None) -> _F:
        """A random linear layer applied to the features: the sample ``z = lin(phi) + b
        bias_1`` and its tangent ``t = lin([phi, psi]) + b bias_3`` (the same weights act on
        the tangent's columns). ``lin(x, part)``: the scaled random map with weights ``part``;
        ``bias(part, ref)``: the bias broadcast like ``ref`` (default: one per channel)."""
        if bias is None:
            def bias(part, ref):
                return _bias_like(self._draw(part, (self.ctx.dim,), phi), ref)
        z = lin(phi, 0)
        if self.b:
            z.add_(bias(1, z), alpha=self.b)
        t = None
        if self.ctx.want_ntk:
            t = lin(phi if psi is None else torch.cat([phi, psi], 1), 2)
            if self.b:
                t.add_(bias(3, t), alpha=self.b)
        return _F(z, t, True)

    def __call__(self, f: _F) -> _F:
        f = f.normed()
        phi, psi = f.phi, f.psi
        ones = torch.ones((phi.shape[0], 1) + tuple(phi.shape[2:]), dtype=phi.dtype,
                          device=phi.device)
        if not self.project:                      # exact: readout layers
            parts = [phi * self.w] + ([ones * self.b] if self.b else [])
            new_phi = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            new_psi = None
            if self.ctx.want_ntk:
                new_psi = new_phi if psi is None else torch.cat([new_phi, psi * self.w], 1)
            return _F(new_phi, new_psi, False)
        m, c = self.ctx.dim, phi.shape[1]
        z = _chan_mix(self._draw(0, (m, c), phi), phi).mul_(self.w)
        if self.b:
            z.add_(_bias_like(self._draw(1, (m,), phi), z), alpha=self.b)
        t = None
        if self.ctx.want_ntk:
            t = _chan_mix(self._draw(2, (m, c), phi), phi).mul_(self.w)
            if self.b:
                t.add_(_bias_like(self._draw(3, (m,), phi), t), alpha=self.b)
            if psi is not None:
                t.add_(_chan_mix(self._draw(4, (m, psi.shape[1]), psi), psi), alpha=self.w)
        return _F(z, t, True)


class _ConvOp(_DenseOp):
    """A random convolution of width ``dim`` (always sampled: an exact patch concatenation
    would multiply the feature count by the filter size at every layer)."""

    def __init__(self, layer: Conv, ctx: _Ctx):
        super().__init__(layer, ctx, True)
        self.layer = layer

    def __call__(self, f: _F) -> _F:
        f = f.normed()
        phi, psi = f.phi, f.psi
        if phi.ndim < 3:
            raise ValueError("Conv needs spatial inputs (N, C, *spatial) in the feature map")
        ns = phi.ndim - 2
        if ns > 3:
            raise NotImplementedError("features: Conv supports 1-3 spatial dimensions")
        filt, strides, pads, circ, _ = self.layer.geometry(tuple(phi.shape[2:]))
        conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                torch.nn.functional.conv3d)[ns - 1]
        scale = self.w / math.sqrt(st.prod(filt))
        m = self.ctx.dim

        def rconv(x, part):
            wt = self._draw(part, (m, x.shape[1]) + tuple(filt), x)
            return conv(st.pad_input(x, pads, circ), wt, stride=strides).mul_(scale)

        return self._sample(phi, psi, rconv)


class _ActOp(_DenseOp):
    def __init__(self, layer: Activation, ctx: _Ctx):
        self.fn = layer.fn
        self.ctx, self.id = ctx, ctx.next_id()
        self.weights = {}

    def __call__(self, f: _F) -> _F:
        if not f.fresh:                         # draw the Gaussian sample first
            m = self.ctx.dim
            z = _chan_mix(self._draw(0, (m, f.phi.shape[1]), f.phi), f.phi)
            t = None
            if f.psi is not None and self.ctx.want_ntk:
                t = _chan_mix(self._draw(1, (m, f.psi.shape[1]), f.psi), f.psi)
        else:
            z, t = f.phi, f.psi
        s = 1.0 / math.sqrt(z.shape[1])
        if t is None or not self.ctx.want_ntk:
            return _F(self.fn(z) * s, None, False)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            y = self.fn(zz)
            (d,) = torch.autograd.grad(y.sum(), zz)
        return _F(y.detach().mul_(s), d.mul_(t).mul_(s), False)


class _LinearSpatialOp(_Op):
    """A parameter-free linear map over the spatial axes (pooling): applied to both feature
    sets; Gaussian samples stay Gaussian samples."""

    def __init__(self, module):
        self.module = module

    def __call__(self, f: _F) -> _F:
        if f.phi.ndim < 3:
            raise ValueError("pooling needs spatial inputs (N, C, *spatial) in the feature map")
        return _F(self.module(f.phi), None if f.psi is None else self.module(f.psi), f.fresh)


class _GlobalPoolOp(_Op):
    def __init__(self, sum_: bool):
        self.sum_ = sum_

    def __call__(self, f: _F) -> _F:
        if f.phi.ndim < 3:
            raise ValueError("global pooling needs spatial inputs (N, C, *spatial)")

        def red(t):
            if t is None:
                return None
            dims = tuple(range(2, t.ndim))
            return t.sum(dims) if self.sum_ else t.mean(dims)
        return _F(red(f.phi), red(f.psi), f.fresh)


class _FlattenOp(_Op):
    def __call__(self, f: _F) -> _F:
        if f.phi.ndim == 2:
            return f
        f = f.normed()
        s = 1.0 / math.sqrt(st.prod(f.phi.shape[2:]))
        return _F(f.phi.flatten(1) * s, None if f.psi is None else f.psi.flatten(1) * s, False)


class _LayerNormOp(_Op):
    """Divide by the estimated norm: the per-pixel variance ``sum_c phi^2``, averaged over the
    normalized spatial axes (none for the default channel-only LayerNorm)."""

    def __init__(self, eps: float, spatial_dims: Tuple[int, ...] = ()):
        self.eps, self.dims = eps, tuple(2 + d for d in spatial_dims)

    def __call__(self, f: _F) -> _F:
        f = f.normed()
        v = f.phi.pow(2).sum(1, keepdim=True)
        if self.dims:
            v = v.mean(self.dims, keepdim=True)
        inv = (v + self.eps).rsqrt()
        return _F(f.phi * inv, None if f.psi is None else f.psi * inv, False)


class _ModuleLinearOp(_Op):
    """A parameter-free map that is linear in its input and acts on every channel alike
    (ImageResize, Index, DotGeneral, Aggregate): ``y = L x`` over the spatial axes gives
    ``K' = L K L^T`` for the NNGP and the NTK alike, so ``phi' = L phi``, ``psi' = L psi``
    exactly, and Gaussian samples stay Gaussian samples (``fresh`` is kept). ``module`` is the
    layer's own finite module (any channel count); Aggregate's reads the chunk's ``pattern``
    from the call-time arguments :func:`features` makes visible."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def __call__(self, f: _F) -> _F:
        if f.phi.ndim < 3:
            raise ValueError(f"{self.name} needs spatial inputs (N, C, *spatial) in the feature "
                             f"map")
        return _F(self.module(f.phi), None if f.psi is None else self.module(f.psi), f.fresh)


class _ConvTransposeOp(_DenseOp):
    """A random transposed convolution of width ``dim`` with ConvTranspose's geometry: for
    ``z = W / sqrt(|F|) G^T* phi + b g`` (``G`` standard normal, ``(c, dim, *F)``),
    ``E z(P) z(Q) = W^2 / |F| sum_t K(src(P, t), src(Q, t)) + b^2`` -- the layer's covariance
    map -- and the tangent ``t`` from ``[phi, psi]`` with an independent ``G'`` adds
    ``W^2 / |F| sum_t T``: the NTK recursion (as :class:`_ConvOp`)."""

    def __init__(self, layer, ctx: _Ctx):
        super().__init__(layer, ctx, True)
        self.layer = layer

    def _apply(self, x: Tensor, w: Tensor, geo) -> Tensor:
        """``ConvTransposeModule.forward`` without its parameters (same crop / fold)."""
        from .conv_variants import fold
        filt, strides, pads, circ, out_sp = geo
        conv = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                torch.nn.functional.conv_transpose3d)[len(filt) - 1]
        y = conv(x, w, stride=strides)
        crop: List[int] = []
        for fd, (lo, hi) in zip(reversed(filt), reversed(pads)):
            crop += [lo - (fd - 1), hi - (fd - 1)]
        if any(crop):
            y = torch.nn.functional.pad(y, crop)
        if circ:
            for d, n in enumerate(out_sp):
                y = fold(y, 2 + d, n, (y.shape[2 + d] - n) // 2)
        return y

    def __call__(self, f: _F) -> _F:
        f = f.normed()
        phi, psi = f.phi, f.psi
        if phi.ndim < 3 or phi.ndim > 5:
            raise ValueError("features: ConvTranspose needs inputs (N, C, *spatial) with 1-3 "
                             "spatial dimensions")
        geo = self.layer.geometry(tuple(phi.shape[2:]))
        scale = self.w / math.sqrt(st.prod(geo[0]))
        m = self.ctx.dim

        def rconv(x, part):
            wt = self._draw(part, (x.shape[1], m) + tuple(geo[0]), x)
            return self._apply(x, wt, geo).mul_(scale)

        return self._sample(phi, psi, rconv)


class _ConvLocalOp(_DenseOp):
    """A random locally connected layer of width ``dim``: Conv's patches, but an independent
    Gaussian filter and bias at every output pixel (weights ``(dim, c, pixels, |F|)``, as many
    as the finite ConvLocal layer of that width). Different pixels are then uncorrelated,
    ``E z(P) z(Q) = 0`` for ``P != Q``, and the pixel diagonal is Conv's: the layer's kernel
    map; the tangent as :class:`_ConvOp`."""

    def __init__(self, layer, ctx: _Ctx):
        super().__init__(layer, ctx, True)
        self.layer = layer

    def __call__(self, f: _F) -> _F:
        f = f.normed()
        phi, psi = f.phi, f.psi
        if phi.ndim < 3:
            raise ValueError("features: ConvLocal needs spatial inputs (N, C, *spatial)")
        filt, strides, pads, circ, out_sp = self.layer.geometry(tuple(phi.shape[2:]))
        p, a = st.prod(out_sp), st.prod(filt)
        scale = self.w / math.sqrt(a)
        m = self.ctx.dim

        def rlocal(x, part):
            u = st.pad_input(x, pads, circ)
            for d in range(len(filt)):     # (N, C, *out, *filter) patches
                u = u.unfold(2 + d, filt[d], strides[d])
            n, c = u.shape[:2]
            wt = self._draw(part, (m, c, p, a), x)
            y = torch.einsum("ncpf,mcpf->nmp", u.reshape(n, c, p, a), wt)
            return y.reshape((n, m) + tuple(out_sp)).mul_(scale)

        def bias(part, ref):       # one bias per channel and output pixel
            return self._draw(part, (m,) + tuple(out_sp), ref).unsqueeze(0)

        return self._sample(phi, psi, rlocal, bias)


class _FanInProdOp(_DenseOp):
    """FanInProd: ``nngp = prod_i K_i``, ``ntk = sum_i T_i prod_{j != i} K_j`` for branches
    that are independent given the input. Each branch is made a Gaussian sample of width
    ``dim`` (``z_i``, tangent ``t_i``; a branch that is not one yet, or that shares its sample
    with another branch, draws its own independent ``G_i`` first, as an activation does);
    then ``phi' = prod_i z_i / sqrt(dim)`` and ``psi' = concat_i [t_i prod_{j != i} z_j] /
    sqrt(dim)``: ``E<phi', phi''> = prod_i K_i`` and ``E<psi', psi''> = sum_i T_i prod_{j != i}
    K_j`` (independent factors; the concatenation has no cross terms)."""

    def __init__(self, ctx: _Ctx):
        self.ctx, self.id = ctx, ctx.next_id()
        self.weights = {}

    def __call__(self, fs):
        if not isinstance(fs, tuple):
            raise ValueError("FanInProd needs several branches (use FanOut first)")
        m = self.ctx.dim
        seen: List[int] = []
        zs, ts = [], []
        for i, f in enumerate(fs):
            if f.fresh and f.phi.shape[1] == m and id(f.phi) not in seen:
                z, t = f.phi, f.psi
            else:
                g = f.normed()
                z = _chan_mix(self._draw(2 * i, (m, g.phi.shape[1]), g.phi), g.phi)
                t = None
                if g.psi is not None and self.ctx.want_ntk:
                    t = _chan_mix(self._draw(2 * i + 1, (m, g.psi.shape[1]), g.psi), g.psi)
            seen.append(id(f.phi))
            zs.append(z)
            ts.append(t)
        s = 1.0 / math.sqrt(m)
        phi = zs[0] * s
        for z in zs[1:]:
            phi = phi * z
        psis = []
        if self.ctx.want_ntk:
            for i, t in enumerate(ts):
                if t is None:            # a parameter-free branch: no NTK term of its own
                    continue
                term = t * s
                for j, z in enumerate(zs):
                    if j != i:
                        term = term * z
                psis.append(term)
        return _F(phi, torch.cat(psis, 1) if psis else None, False)


class _FanOutOp(_Op):
    def __init__(self, n):
        self.n = n

    def __call__(self, f):
        return (f,) * self.n


class _ParallelOp(_Op):
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, fs):
        if not isinstance(fs, tuple) or len(fs) != len(self.ops):
            raise ValueError(f"parallel with {len(self.ops)} branches needs {len(self.ops)} "
                             f"inputs; put FanOut({len(self.ops)}) before it")
        return tuple(op(f) for op, f in zip(self.ops, fs))


class _FanInOp(_Op):
    """FanInSum (weights 1: kernels add) or FanInConcat (weights ``c_i / sum c``)."""

    def __init__(self, weights: Optional[Sequence[float]]):
        self.weights = weights

    def __call__(self, fs):
        if not isinstance(fs, tuple):
            raise ValueError("FanInSum/FanInConcat need several branches (use FanOut first)")
        fs = [f.normed() for f in fs]
        ws = [1.0] * len(fs) if self.weights is None else list(self.weights)
        phi = torch.cat([f.phi * math.sqrt(w) for f, w in zip(fs, ws)], 1)
        psis = [f.psi * math.sqrt(w) for f, w in zip(fs, ws) if f.psi is not None]
        return _F(phi, torch.cat(psis, 1) if psis else None, False)


def _first(layer: Layer) -> Layer:
    while isinstance(layer, Serial) and layer.layers:
        layer = layer.layers[0]
    return layer


def _compile(layer: Layer, in_shape, ctx: _Ctx, followed_by_act: bool):
    """``(op, out_shape)``: draw nothing yet (weights are drawn on first use, from the seed)."""
    name = type(layer).__name__
    if isinstance(layer, Serial):
        ops = []
        for i, sub in enumerate(layer.layers):
            nxt = layer.layers[i + 1] if i + 1 < len(layer.layers) else None
            act_next = isinstance(_first(nxt), Activation) if nxt is not None else followed_by_act
            op, in_shape = _compile(sub, in_shape, ctx, act_next)
            ops.append(op)
        return _Seq(ops), in_shape
    out_shape = layer.out_shape(in_shape)
    if isinstance(layer, Dense):
        return _DenseOp(layer, ctx, followed_by_act), out_shape
    if isinstance(layer, Conv):
        return _ConvOp(layer, ctx), out_shape
    if isinstance(layer, Activation):
        return _ActOp(layer, ctx), out_shape
    if isinstance(layer, _Pool):
        mod, _ = layer.build(in_shape, cast(Any, None), False)   # pooling needs no context
        return _LinearSpatialOp(mod), out_shape
    if isinstance(layer, _GlobalPool):
        return _GlobalPoolOp(layer._sum), out_shape
    if isinstance(layer, Flatten):
        return _FlattenOp(), out_shape
    if isinstance(layer, (LayerNorm, LayerNormAxes)):
        return _LayerNormOp(layer.eps, layer._spatial_axes(len(in_shape))), out_shape
    if isinstance(layer, Identity):
        return _Seq([]), out_shape
    if isinstance(layer, FanOut):
        return _FanOutOp(layer.n), out_shape
    if isinstance(layer, Parallel):
        built = [_compile(l, s, ctx, followed_by_act) for l, s in zip(layer.layers, in_shape)]
        return _ParallelOp([b[0] for b in built]), tuple(b[1] for b in built)
    if isinstance(layer, FanInSum):
        return _FanInOp(None), out_shape
    if isinstance(layer, FanInConcat):
        c = [s[0] for s in in_shape]
        return _FanInOp([ci / sum(c) for ci in c]), out_shape
    if isinstance(layer, FanInProd):
        return _FanInProdOp(ctx), out_shape
    if isinstance(layer, ConvTranspose):
        return _ConvTransposeOp(layer, ctx), out_shape
    if isinstance(layer, ConvLocal):
        return _ConvLocalOp(layer, ctx), out_shape
    if isinstance(layer, (ImageResize, Index, Aggregate)):   # parameter-free linear modules
        mod, _ = layer.build(in_shape, cast(Any, None), False)
        return _ModuleLinearOp(mod, name), out_shape
    if isinstance(layer, DotGeneral):
        return _ModuleLinearOp(DotGeneralModule(layer, layer._plan(tuple(in_shape)),
                                                torch.float64), name), out_shape
    if isinstance(layer, Dropout):
        if not layer.per_pass_noise:      # mode='test' or rate=1: the identity
            return _Seq([]), out_shape
        raise NotImplementedError(
            f"features: no random-feature rule for Dropout(rate={layer.rate}, mode='train'): its "
            f"kernel is that of one forward pass with random masks (the batch diagonal scaled "
            f"by 1/rate), which no fixed feature map reproduces; use Dropout(rate, mode='test') "
            f"(the identity) for features, or arch.kernel / method='jacobian'")
    if isinstance(layer, GlobalSelfAttention):
        raise NotImplementedError(
            "features(method='rf'): no random-feature rule for GlobalSelfAttention (its "
            "infinite-width attention weights are a nonlinear function of each example's "
            "pixel-pair covariance, not a map of the feature columns); use "
            "method='jacobian' (the sketched Jacobian of a finite network) or arch.kernel")
    raise NotImplementedError(
        f"features: no random-feature rule for {name}; supported: Dense, Conv, ConvTranspose, "
        f"ConvLocal, activations, AvgPool, SumPool, GlobalAvgPool, GlobalSumPool, Flatten, "
        f"LayerNorm, ImageResize, Index, DotGeneral, Aggregate, Dropout(mode='test'), Identity, "
        f"FanOut, parallel, FanInSum, FanInConcat, FanInProd; use method='jacobian' (the "
        f"sketched Jacobian of a finite network) for the others")


def _check_frozen(frozen: Any, n_layers: int) -> frozenset:
    """``frozen`` (indices into the network's Dense/Conv layers in forward order, negative
    from the end) as a set of non-negative indices; at least one layer stays trained."""
    if isinstance(frozen, (int, str)) or not isinstance(frozen, Sequence):
        raise TypeError(f"`frozen` must be a sequence of layer indices (e.g. frozen=(0, -1) for "
                        f"the first and last Dense/Conv layers), got {frozen!r}")
    out = set()
    for i in frozen:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(f"`frozen` holds indices into the architecture's {n_layers} "
                             f"Dense/Conv layers (forward order, negative from the end), "
                             f"got {i!r} in {tuple(frozen)!r}")
        out.add(i % n_layers)
    if len(out) == n_layers:
        raise ValueError(f"`frozen={tuple(frozen)!r}` leaves no layer trained: the NTK would be "
                         f"zero; freeze fewer of the {n_layers} Dense/Conv layers")
    return frozenset(out)


def _count_sketch(v: Tensor, out_dim: int, seed: int) -> Tensor:
    """Unbiased ``(n, D) -> (n, out_dim)`` compression: ``E <S a, S b> = <a, b>``."""
    g = _gen(seed, 0, 7)
    d = v.shape[1]
    idx = torch.randint(0, out_dim, (d,), generator=g, device="cpu").to(v.device)
    sign = (torch.randint(0, 2, (d,), generator=g, device="cpu") * 2 - 1).to(
        device=v.device, dtype=v.dtype)
    out = torch.zeros((v.shape[0], out_dim), dtype=v.dtype, device=v.device)
    return out.index_add_(1, idx, v * sign)


class _JacobianMap:
    """``method='jacobian'``: the sketched Jacobian of one random finite network of the
    architecture (width ``dim``, NTK parameterization), ``phi(x) = S d f_0(x) / d theta``.

    ``phi(x) . phi(x')`` is then an unbiased estimate (over the sketch ``S``) of the network's
    empirical NTK, whose mean over initializations is the exact NTK up to ``O(1/dim)``. Unlike
    ``'rf'`` (whose NTK features have ``2 dim`` columns after global pooling), its rank is not
    tied to the width: a conv layer contributes the ``dim x (C k^2)`` matrix
    ``sum_p delta_p (x) patch_p`` per example (the pixel-pair structure of the CNTK), built with
    one batched product per layer and compressed by a CountSketch to ``out_dim`` columns. Cost:
    a forward and a backward pass of the width-``dim`` network plus one product of the same
    size per layer. NNGP features are the readout layer's gradient (``W_std/sqrt(fan_in) h``
    and ``b_std``), exact given the hidden layers."""

    def __init__(self, arch: Layer, in_shape, dim: int, seed: int, dtype, device,
                 frozen: Sequence[int] = ()):
        from .conv import ConvModule
        from .dense import AffineModule
        self.net = arch.module(tuple(in_shape), width=dim, seed=seed, dtype=dtype).to(device)
        self.net.requires_grad_(True)
        self.mods = [m for m in self.net.modules() if isinstance(m, (ConvModule, AffineModule))]
        self.conv_t = ConvModule
        own = {id(p) for m in self.mods for p in m.parameters(recurse=False)}
        other = [n for n, p in self.net.named_parameters() if id(p) not in own]
        if other:
            raise NotImplementedError(
                f"features(method='jacobian') handles the parameters of Dense and Conv layers; "
                f"this architecture also has {other[:3]} (e.g. attention or a per-unit affine "
                f"map): use method='rf' where it applies, or ntkit.empirical_ntk")
        self.seed = seed
        self.sizes = [m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                      for m in self.mods]
        self.frozen = _check_frozen(frozen, len(self.mods))

    def _grads(self, m, inp: Tensor, delta: Tensor) -> List[Tensor]:
        """Per-example gradients ``(n, *param)`` flattened, of the weight (and bias)."""
        n = inp.shape[0]
        if isinstance(m, self.conv_t):
            # sum_p delta_p (x) patch_p, one batched product per filter offset (F.unfold's
            # im2col is ~20x slower on CPU than these strided views)
            x = st.pad_input(inp, m.pads, m.circular)
            out_sp = tuple(delta.shape[2:])
            d = delta.reshape(n, delta.shape[1], -1)
            gw = x.new_empty((n, delta.shape[1], x.shape[1]) + tuple(m.filt))
            for off in itertools.product(*(range(f) for f in m.filt)):
                sl = tuple(slice(o, o + s_ * (k - 1) + 1, s_)
                           for o, s_, k in zip(off, m.strides, out_sp))
                xs = x[(slice(None), slice(None)) + sl].reshape(n, x.shape[1], -1)
                gw[(Ellipsis,) + off] = torch.bmm(d, xs.transpose(1, 2))
            gw = gw.reshape(n, -1).mul_(m.w_scale)
        else:
            d = delta.reshape(n, delta.shape[1], -1)
            a = inp.reshape(n, inp.shape[1], -1)
            gw = torch.bmm(d, a.transpose(1, 2)).reshape(n, -1).mul_(m.w_scale)
        out = [gw]
        if m.bias is not None:
            out.append(d.sum(2).mul_(m.b_scale))
        return out

    def __call__(self, xb: Tensor, keys, out_dim: Optional[int],
                 call_args: Optional[Dict[str, Any]] = None,
                 mask_constant: Optional[float] = None) -> Dict[str, Tensor]:
        """Features of the examples ``xb``; ``call_args``: their call-time arguments
        (``name -> per-example rows``), passed to the network as ``net(xb, **call_args)``;
        ``mask_constant``: the network runs as ``net(xb, mask_constant=c)``."""
        from ._masking import Masked, unwrap
        recs: List[Tuple[Any, Tensor, Tensor]] = []
        final: List[Any] = []   # the last module's output as the network returns it

        def hook(mod, inputs, output):
            # with masks the modules pass Masked values: the layer's input is its value zeroed
            # at masked positions (what the weights multiply) and its output the value (whose
            # masked positions the next layer zeroes, so their gradient is zero)
            inp, _ = unwrap(inputs[0])
            out = output.value if isinstance(output, Masked) else output
            recs.append((mod, inp.detach(), out))
            final[:] = [unwrap(output)[0]]
        # prepend: run before the top module's mask hook turns its output into a plain tensor
        handles = [m.register_forward_hook(hook, prepend=True) for m in self.mods]
        try:
            with torch.enable_grad():
                kw = dict(call_args or {})
                if mask_constant is not None:
                    kw["mask_constant"] = mask_constant
                y = self.net(xb, **kw)
                outs = [r[2] for r in recs]
                if len(recs) != len(self.mods) or len({id(r[0]) for r in recs}) != len(recs):
                    raise NotImplementedError(
                        "features(method='jacobian') needs every Dense/Conv layer to run once "
                        "per forward pass (no shared or skipped layers)")
                deltas = torch.autograd.grad(y.reshape(y.shape[0], -1)[:, 0].sum(), outs,
                                             allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        res: Dict[str, Tensor] = {}
        last, last_out = recs[-1][0], final[0]
        if "nngp" in keys:
            if isinstance(last, self.conv_t) or last_out.shape != y.shape or not bool(
                    (last_out == y).all()):
                raise ValueError("features(method='jacobian', get='nngp') needs an architecture "
                                 "ending in a Dense readout; use method='rf'")
            res["nngp"] = self._sketch(torch.cat(self._grads(last, recs[-1][1],
                                                             deltas[-1]), 1), out_dim, 10 ** 6)
        if "ntk" in keys:
            total = self.trained_size()
            n = xb.shape[0]
            if out_dim is None or out_dim >= total:
                parts = []
                for i, ((m, inp, _), d) in enumerate(zip(recs, deltas)):
                    if self.mods.index(m) in self.frozen:
                        continue
                    parts += (self._grads(m, inp, d) if d is not None else
                              [xb.new_zeros((n, self.sizes[self.mods.index(m)]))])
                res["ntk"] = torch.cat(parts, 1)
            else:
                acc = xb.new_zeros((n, out_dim))
                for i, ((m, inp, _), d) in enumerate(zip(recs, deltas)):
                    if d is None or self.mods.index(m) in self.frozen:
                        continue
                    for j, g in enumerate(self._grads(m, inp, d)):
                        acc += _count_sketch(g, out_dim, self.seed * 7919 + 2 * i + j)
                res["ntk"] = acc
        return res

    def trained_size(self) -> int:
        """Raw NTK columns: the parameters of the layers that are not ``frozen``."""
        return sum(s for i, s in enumerate(self.sizes) if i not in self.frozen)

    def _sketch(self, g: Tensor, out_dim: Optional[int], part: int) -> Tensor:
        if out_dim is None or out_dim >= g.shape[1]:
            return g
        return _count_sketch(g, out_dim, self.seed * 7919 + part)


def _refuse_standard(layer: Layer) -> None:
    """The width-``dim`` network's NTK matches the architecture's only in NTK parameterization
    (in standard parameterization the kernel depends on the widths written in the spec)."""
    for sub in layer.walk():
        param = getattr(sub, "parameterization", "ntk")
        if param != "ntk":
            raise NotImplementedError(
                f"features: {type(sub).__name__}(parameterization={param!r}) is "
                f"not supported; feature maps are implemented for the NTK parameterization (the "
                f"default of ntkit.layers; for a converted torch module use from_torch(net, "
                f"parameterization='ntk'), its infinite-width limit)")


def _check_finite(t: Tensor, key: str, xb: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"the {key} features overflow {xb.dtype} (non-finite values): the kernel grows too "
            f"fast with the input scale or depth; rescale `x`, lower W_std, or use "
            f"dtype=torch.float64")


def _parse_budget(memory_budget, device=None) -> int:
    """Bytes for one chunk's work: the given budget, else half of what is free where ``x``
    lives (RAM, or the GPU's memory for CUDA inputs)."""
    budget = parse_memory_budget(memory_budget)
    return available_memory(device) // 2 if budget is None else int(budget)


def features(arch: Layer, x: Any, dim: int = 1024, get: Union[str, Sequence[str], None] = "ntk", *,
             seed: int = 0, method: str = "rf", out_dim: Optional[int] = None,
             dtype: torch.dtype = torch.float32, memory_budget: Optional[int] = None,
             chunk: Optional[int] = None, progress: bool = False,
             mask_constant: Optional[float] = None, frozen: Sequence[int] = (),
             **call_args: Any) -> Any:   # a Tensor, or a dict for a tuple `get`
    """Random features whose inner products approximate the exact kernel of ``arch``.

    ``phi = features(arch, x, dim)`` gives ``phi(x1) @ phi(x2).T ~= arch.kernel(x1, x2, get)``
    (relative error ~ ``dim^-1/2``) with the same ``seed``. Use them for linear models on data
    sets too large for an ``n x n`` kernel (see :func:`ntkit.features.ridge`).

    Args:
      arch: an ``ntkit.layers`` architecture (NTK parameterization) whose output kernel is
        ``(n1, n2)`` (e.g. ending in Flatten/GlobalAvgPool + Dense for images).
      x: ``(n, d)`` or ``(n, C, *spatial)`` inputs (tensor or array; any device).
      dim: width of the random network (features per layer and pixel).
      get: ``'nngp'`` or ``'ntk'`` (a tensor), or a tuple of both (a dict of tensors).
      seed: the random weights; the same seed gives the same map for every call and chunk.
      method: ``'rf'`` (random features of the width-``dim`` network and its tangent: ``2 dim``
        NTK columns per pixel) or ``'jacobian'`` (the gradient of one random width-``dim``
        network, sketched to ``out_dim`` columns: its rank is not tied to ``dim``, which is
        what large data sets need after global pooling; Dense and Conv parameters).
      out_dim: compress the result to this many columns by an unbiased CountSketch
        (useful after Flatten, where the natural size is ``dim * pixels``).
      dtype: ``torch.float32`` (default) or ``torch.float64``.
      memory_budget: bytes for one chunk of examples (default: half the available RAM), or a
        string such as ``'2GB'``.
      chunk: examples per chunk (default: from ``memory_budget``).
      progress: show a progress bar over chunks.
      mask_constant: neural-tangents' masking, as in ``arch.kernel(x, mask_constant=c)``:
        positions of ``x`` whose channels all equal ``c`` are padding (compared in ``x``'s own
        dtype; ``NaN`` matches ``NaN``). ``method='jacobian'`` runs the finite network as
        ``net(x, mask_constant=c)``, so ``phi @ phi.T`` estimates the masked kernel and padding
        does not change an example's features. ``method='rf'`` has no random-feature rule for
        masks and refuses it (``ValueError``).
      frozen: ``method='jacobian'`` only: indices of Dense/Conv layers (forward order,
        negative from the end) whose parameters are left out of the NTK features -- the NTK
        of a network in which those layers are not trained. ``frozen=(0, -1)`` is Arora et
        al.'s (2019) CNTK protocol (``--fix``: first layer and readout fixed); freezing
        everything but the readout gives the NNGP. The NNGP features do not depend on it.
      **call_args: call-time arguments of the architecture, as in ``arch.kernel`` (e.g. the
        graph ``pattern=p`` of :class:`~ntkit.layers.Aggregate`, one per example of ``x``).
        Both methods use each chunk's rows (``net(x[i:j], pattern=p[i:j])`` for
        ``'jacobian'``; ``'rf'`` aggregates the feature columns with ``p[i:j]``, exactly).

    Returns:
      ``(n, D)`` tensor (``D`` = :func:`feature_dim`, or ``out_dim``) on ``x``'s device.

    Example::

        >>> arch = serial(Dense(512), Relu(), Dense(1))
        >>> phi = features(arch, torch.randn(100, 8), dim=4096, get='ntk')
        >>> (phi @ phi.T - arch.kernel(torch.randn(100, 8), get='ntk'))  # ~ 1/sqrt(4096)
    """
    if not isinstance(arch, Layer):
        raise TypeError(f"`arch` must be an ntkit.layers architecture, got {type(arch).__name__}")
    if method not in ("rf", "jacobian"):
        raise ValueError(f"`method` must be 'rf' (random features of the network and its "
                         f"tangent) or 'jacobian' (sketched Jacobian of a random finite "
                         f"network), got {method!r}")
    check_int(dim, "dim")
    if out_dim is not None:
        check_int(out_dim, "out_dim")
    if chunk is not None:
        check_int(chunk, "chunk")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    keys, single = parse_get(get)
    if method == "rf" and (not isinstance(frozen, Sequence) or len(frozen)):
        raise ValueError(f"`frozen={frozen!r}` (layers left untrained) needs method='jacobian' "
                         f"(the Jacobian of a finite network without those layers' parameters); "
                         f"method='rf' has no rule for it")
    if mask_constant is not None:
        if method == "rf":
            raise ValueError(
                "features(method='rf') does not support `mask_constant` (its layer-wise random "
                "features have no rule for masked positions); use method='jacobian' (the "
                "sketched Jacobian of a finite network run as net(x, mask_constant=c)), or crop "
                "the padding and call without mask_constant")
        from ._mask_inputs import masked_input
        from ._masking import check_mask_constant, check_supported
        mask_constant = check_mask_constant(mask_constant)
        check_supported(arch)
        x = masked_input(x, "x", dtype, mask_constant)
    else:
        x = as_tensor(x, "x", dtype)
    if x.shape[0] == 0 or any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"`x` must have at least one example and one feature, got shape "
                         f"{tuple(x.shape)}")
    args = {name: a1 for name, (a1, _) in
            prepare_call_args(arch, call_args, x.shape[0], None).items()} if call_args else {}
    if args and method == "rf":
        readers = sorted({type(sub).__name__ for sub in arch.walk()
                          if set(sub.call_args) & set(args) and not isinstance(sub, Aggregate)})
        if readers:
            raise NotImplementedError(
                f"features(method='rf') has no random-feature rule for {', '.join(readers)} "
                f"(which read the call-time arguments {sorted(args)}); use method='jacobian' (the "
                f"sketched Jacobian of a finite network run as "
                f"net(x, {', '.join(f'{n}=...' for n in args)}))")
    budget = _parse_budget(memory_budget, x.device)
    want_ntk = "ntk" in keys
    ctx = _Ctx(dim, seed, want_ntk)
    jac = op = None
    _refuse_standard(arch)   # both maps: the layer-wise random network is NTK-parameterized
    if method == "rf":
        op, out_shape = _compile(arch, tuple(x.shape[1:]), ctx, False)
    else:
        out_shape = arch.out_shape(tuple(x.shape[1:]))
        jac = _JacobianMap(arch, x.shape[1:], dim, seed, dtype, x.device, frozen)
        if out_dim is None and "ntk" in keys and jac.trained_size() > 1 << 20:
            raise ValueError(f"features(method='jacobian') has {jac.trained_size()} raw columns "
                             f"(one per parameter of the width-{dim} network): pass `out_dim` "
                             f"(e.g. out_dim=8192) to sketch them")
    if isinstance(out_shape, tuple) and out_shape and isinstance(out_shape[0], tuple):
        raise ValueError("the architecture ends in several branches; merge them with FanInSum() "
                         "or FanInConcat()")
    if len(out_shape) != 1:
        raise ValueError(f"features need an architecture whose kernel is (n1, n2); its output "
                         f"has per-example shape {out_shape}: end it with Flatten() or "
                         f"GlobalAvgPool() (and a Dense readout)")

    def run(xb, rows: slice):
        if jac is not None:
            res = jac(xb, keys, out_dim, {name: a[rows] for name, a in args.items()},
                      mask_constant)
            for key, t in res.items():
                _check_finite(t, key, xb)
            return res
        assert op is not None         # compiled whenever there is no Jacobian map
        # the chunk's call-time arguments (Aggregate's pattern), read by the layers' modules
        with torch.no_grad(), using_call_args({name: (a[rows], None)
                                               for name, a in args.items()}):
            c = xb.shape[1]
            f = op(_F(xb / math.sqrt(c), None, False)).normed()
        res = {}
        for key in keys:
            t = f.phi if key == "nngp" else f.psi
            if t is None:   # an NTK that is identically zero (no trainable layer)
                t = torch.zeros((xb.shape[0], 1), dtype=xb.dtype, device=xb.device)
            t = t.reshape(xb.shape[0], -1)
            _check_finite(t, key, xb)
            if out_dim is not None and out_dim < t.shape[1]:
                t = _count_sketch(t, out_dim, seed)
            res[key] = t
        return res

    first = run(x[:1], slice(0, 1))
    if chunk is None:
        item = x.element_size()
        width = max(dim, x.shape[1])
        per_example = 12 * width * st.prod(x.shape[2:]) * item + 4 * sum(
            v.shape[1] for v in first.values()) * item
        if jac is not None:   # the autograd graph and one layer's per-example gradient
            per_example = 3 * per_example + 2 * max(jac.sizes) * item
        chunk = int(max(1, min(x.shape[0], budget // max(per_example, 1))))
    outs: Dict[str, List[Tensor]] = {k: [] for k in keys}
    starts = range(0, x.shape[0], chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="features", unit="chunk")
    for s in starts:
        r = run(x[s:s + chunk], slice(s, s + chunk))
        for k in keys:
            outs[k].append(r[k])
    res = {k: torch.cat(v, 0) for k, v in outs.items()}
    return res[keys[0]] if single else res


def feature_dim(arch: Layer, in_shape: Union[int, Sequence[int]], dim: int,
                get: str = "ntk", **call_args: Any) -> int:
    """Number of columns :func:`features` returns for inputs of per-example shape ``in_shape``
    (``**call_args``: one example's call-time arguments, e.g. ``pattern=a[:1]`` for
    :class:`~ntkit.layers.Aggregate`)."""
    x = torch.zeros((1,) + tuple((in_shape,) if isinstance(in_shape, int) else in_shape))
    return int(features(arch, x + 1, dim, get, **call_args).shape[1])
