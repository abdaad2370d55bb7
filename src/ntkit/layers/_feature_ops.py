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

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import _stencil as st

__all__ = ["Feats", "FeatureContext", "FeatureOp", "SeqOp", "DenseOp", "SpatialSampleOp",
           "ConvOp", "ActOp",
           "LinearSpatialOp", "GlobalPoolOp", "FlattenOp", "LayerNormOp", "ModuleLinearOp",
           "ConvTransposeOp", "ConvLocalOp", "FanInProdOp", "FanOutOp", "ParallelOp", "FanInOp",
           "count_sketch", "generator", "randn", "chan_mix"]

Tensor = torch.Tensor


class Feats:
    """Features of a batch at one point of the network.

    ``fresh=False``: ``K ~= sum_c phi phi'`` (channel axis 1). ``fresh=True``: every channel is an
    independent ``N(0, K)`` sample, ``K ~= mean_c phi phi'`` (and ``psi`` likewise, independent
    of ``phi``)."""
    __slots__ = ("phi", "psi", "fresh")

    def __init__(self, phi: Tensor, psi: Optional[Tensor], fresh: bool):
        self.phi, self.psi, self.fresh = phi, psi, fresh

    def normed(self) -> "Feats":
        if not self.fresh:
            return self
        s = 1.0 / math.sqrt(self.phi.shape[1])
        return Feats(self.phi * s, None if self.psi is None else self.psi * s, False)


class FeatureContext:
    def __init__(self, dim: int, seed: int, want_ntk: bool):
        self.dim, self.seed, self.want_ntk = dim, seed, want_ntk
        self.n_ops = 0

    def next_id(self) -> int:
        self.n_ops += 1
        return self.n_ops


def generator(seed: int, op_id: int, part: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + op_id * 101 + part) % (2 ** 63))
    return g


def randn(shape, seed, op_id, part, like: Tensor) -> Tensor:
    """Gaussian weights drawn on the CPU from (seed, op, part), then moved: the same numbers on
    every device and for every chunk of examples. (Orthogonal random features were tried: no
    measurable gain here, and a QR per layer that dominated the cost at large ``dim``.)"""
    return torch.randn(shape, generator=generator(seed, op_id, part), dtype=torch.float64,
                       device="cpu").to(dtype=like.dtype, device=like.device)


def chan_mix(w: Tensor, x: Tensor) -> Tensor:
    """``(m, c) x (n, c, *S) -> (n, m, *S)``."""
    if x.ndim == 2:
        return x @ w.T
    return torch.einsum("mc,nc...->nm...", w, x)


def bias_like(h: Tensor, ref: Tensor) -> Tensor:
    return h.reshape((1, -1) + (1,) * (ref.ndim - 2))


class FeatureOp:
    def __call__(self, f):  # pragma: no cover - abstract
        raise NotImplementedError


class SeqOp(FeatureOp):
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, f):
        for op in self.ops:
            f = op(f)
        return f


class DenseOp(FeatureOp):
    def __init__(self, layer: Any, ctx: FeatureContext, project: bool):
        self.w, self.b = layer.W_std, (layer.b_std or 0.0)
        self.project, self.ctx, self.id = project, ctx, ctx.next_id()
        self.weights: Dict[Tuple, Tensor] = {}

    def _draw(self, part, shape, like):
        key = (part, shape, like.dtype, like.device)
        if key not in self.weights:
            self.weights[key] = randn(shape, self.ctx.seed, self.id, part, like)
        return self.weights[key]

    def _sample(self, phi: Tensor, psi: Optional[Tensor], lin, bias=None) -> Feats:
        """A random linear layer applied to the features: the sample ``z = lin(phi) + b
        bias_1`` and its tangent ``t = lin([phi, psi]) + b bias_3`` (the same weights act on
        the tangent's columns). ``lin(x, part)``: the scaled random map with weights ``part``;
        ``bias(part, ref)``: the bias broadcast like ``ref`` (default: one per channel)."""
        if bias is None:
            def bias(part, ref):
                return bias_like(self._draw(part, (self.ctx.dim,), phi), ref)
        z = lin(phi, 0)
        if self.b:
            z.add_(bias(1, z), alpha=self.b)
        t = None
        if self.ctx.want_ntk:
            t = lin(phi if psi is None else torch.cat([phi, psi], 1), 2)
            if self.b:
                t.add_(bias(3, t), alpha=self.b)
        return Feats(z, t, True)

    def __call__(self, f: Feats) -> Feats:
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
            return Feats(new_phi, new_psi, False)
        m, c = self.ctx.dim, phi.shape[1]
        z = chan_mix(self._draw(0, (m, c), phi), phi).mul_(self.w)
        if self.b:
            z.add_(bias_like(self._draw(1, (m,), phi), z), alpha=self.b)
        t = None
        if self.ctx.want_ntk:
            t = chan_mix(self._draw(2, (m, c), phi), phi).mul_(self.w)
            if self.b:
                t.add_(bias_like(self._draw(3, (m,), phi), t), alpha=self.b)
            if psi is not None:
                t.add_(chan_mix(self._draw(4, (m, psi.shape[1]), psi), psi), alpha=self.w)
        return Feats(z, t, True)


class SpatialSampleOp(DenseOp):
    """Base of the random spatial layers (Conv, ConvTranspose, ConvLocal): always sampled, with
    the layer's own geometry; :meth:`inputs` checks the feature map's spatial rank."""

    def __init__(self, layer: Any, ctx: FeatureContext):
        super().__init__(layer, ctx, True)
        self.layer = layer

    def inputs(self, f: Feats, name: str, max_spatial: Optional[int] = None
               ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(phi, psi)`` of ``f`` as per-channel features, refused unless ``(N, C, *spatial)``
        with 1 to ``max_spatial`` spatial axes."""
        f = f.normed()
        ns = f.phi.ndim - 2
        if ns < 1 or (max_spatial is not None and ns > max_spatial):
            most = "" if max_spatial is None else f" with 1-{max_spatial} spatial dimensions"
            raise ValueError(f"features: {name} needs inputs (N, C, *spatial){most}, got "
                             f"features of shape {tuple(f.phi.shape)}")
        return f.phi, f.psi


class ConvOp(SpatialSampleOp):
    """A random convolution of width ``dim`` (always sampled: an exact patch concatenation
    would multiply the feature count by the filter size at every layer)."""

    def __call__(self, f: Feats) -> Feats:
        phi, psi = self.inputs(f, "Conv")
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


class ActOp(DenseOp):
    def __init__(self, layer: Any, ctx: FeatureContext):
        self.fn = layer.fn
        self.ctx, self.id = ctx, ctx.next_id()
        self.weights = {}

    def __call__(self, f: Feats) -> Feats:
        if not f.fresh:                         # draw the Gaussian sample first
            m = self.ctx.dim
            z = chan_mix(self._draw(0, (m, f.phi.shape[1]), f.phi), f.phi)
            t = None
            if f.psi is not None and self.ctx.want_ntk:
                t = chan_mix(self._draw(1, (m, f.psi.shape[1]), f.psi), f.psi)
        else:
            z, t = f.phi, f.psi
        s = 1.0 / math.sqrt(z.shape[1])
        if t is None or not self.ctx.want_ntk:
            return Feats(self.fn(z) * s, None, False)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            y = self.fn(zz)
            (d,) = torch.autograd.grad(y.sum(), zz)
        return Feats(y.detach().mul_(s), d.mul_(t).mul_(s), False)


class LinearSpatialOp(FeatureOp):
    """A parameter-free linear map over the spatial axes (pooling): applied to both feature
    sets; Gaussian samples stay Gaussian samples."""

    def __init__(self, module):
        self.module = module

    def __call__(self, f: Feats) -> Feats:
        if f.phi.ndim < 3:
            raise ValueError("pooling needs spatial inputs (N, C, *spatial) in the feature map")
        return Feats(self.module(f.phi), None if f.psi is None else self.module(f.psi), f.fresh)


class GlobalPoolOp(FeatureOp):
    def __init__(self, sum_: bool):
        self.sum_ = sum_

    def __call__(self, f: Feats) -> Feats:
        if f.phi.ndim < 3:
            raise ValueError("global pooling needs spatial inputs (N, C, *spatial)")

        def red(t):
            if t is None:
                return None
            dims = tuple(range(2, t.ndim))
            return t.sum(dims) if self.sum_ else t.mean(dims)
        return Feats(red(f.phi), red(f.psi), f.fresh)


class FlattenOp(FeatureOp):
    def __call__(self, f: Feats) -> Feats:
        if f.phi.ndim == 2:
            return f
        f = f.normed()
        s = 1.0 / math.sqrt(st.prod(f.phi.shape[2:]))
        return Feats(f.phi.flatten(1) * s, None if f.psi is None else f.psi.flatten(1) * s, False)


class LayerNormOp(FeatureOp):
    """Divide by the estimated norm: the per-pixel variance ``sum_c phi^2``, averaged over the
    normalized spatial axes (none for the default channel-only LayerNorm)."""

    def __init__(self, eps: float, spatial_dims: Tuple[int, ...] = ()):
        self.eps, self.dims = eps, tuple(2 + d for d in spatial_dims)

    def __call__(self, f: Feats) -> Feats:
        f = f.normed()
        v = f.phi.pow(2).sum(1, keepdim=True)
        if self.dims:
            v = v.mean(self.dims, keepdim=True)
        inv = (v + self.eps).rsqrt()
        return Feats(f.phi * inv, None if f.psi is None else f.psi * inv, False)


class ModuleLinearOp(FeatureOp):
    """A parameter-free map that is linear in its input and acts on every channel alike
    (ImageResize, Index, DotGeneral, Aggregate): ``y = L x`` over the spatial axes gives
    ``K' = L K L^T`` for the NNGP and the NTK alike, so ``phi' = L phi``, ``psi' = L psi``
    exactly, and Gaussian samples stay Gaussian samples (``fresh`` is kept). ``module`` is the
    layer's own finite module (any channel count); Aggregate's reads the chunk's ``pattern``
    from the call-time arguments :func:`features` makes visible."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def __call__(self, f: Feats) -> Feats:
        if f.phi.ndim < 3:
            raise ValueError(f"{self.name} needs spatial inputs (N, C, *spatial) in the feature "
                             f"map")
        return Feats(self.module(f.phi), None if f.psi is None else self.module(f.psi), f.fresh)


class ConvTransposeOp(SpatialSampleOp):
    """A random transposed convolution of width ``dim`` with ConvTranspose's geometry: for
    ``z = W / sqrt(|F|) G^T* phi + b g`` (``G`` standard normal, ``(c, dim, *F)``),
    ``E z(P) z(Q) = W^2 / |F| sum_t K(src(P, t), src(Q, t)) + b^2`` -- the layer's covariance
    map -- and the tangent ``t`` from ``[phi, psi]`` with an independent ``G'`` adds
    ``W^2 / |F| sum_t T``: the NTK recursion (as :class:`ConvOp`)."""

    def _apply(self, x: Tensor, w: Tensor, geo) -> Tensor:
        """``ConvTransposeModule.forward`` without its parameters (same crop / fold)."""
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
                y = st.fold(y, 2 + d, n, (y.shape[2 + d] - n) // 2)
        return y

    def __call__(self, f: Feats) -> Feats:
        phi, psi = self.inputs(f, "ConvTranspose", 3)
        geo = self.layer.geometry(tuple(phi.shape[2:]))
        scale = self.w / math.sqrt(st.prod(geo[0]))
        m = self.ctx.dim

        def rconv(x, part):
            wt = self._draw(part, (x.shape[1], m) + tuple(geo[0]), x)
            return self._apply(x, wt, geo).mul_(scale)

        return self._sample(phi, psi, rconv)


class ConvLocalOp(SpatialSampleOp):
    """A random locally connected layer of width ``dim``: Conv's patches, but an independent
    Gaussian filter and bias at every output pixel (weights ``(dim, c, pixels, |F|)``, as many
    as the finite ConvLocal layer of that width). Different pixels are then uncorrelated,
    ``E z(P) z(Q) = 0`` for ``P != Q``, and the pixel diagonal is Conv's: the layer's kernel
    map; the tangent as :class:`ConvOp`."""

    def __call__(self, f: Feats) -> Feats:
        phi, psi = self.inputs(f, "ConvLocal")
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


class FanInProdOp(DenseOp):
    """FanInProd: ``nngp = prod_i K_i``, ``ntk = sum_i T_i prod_{j != i} K_j`` for branches
    that are independent given the input. Each branch is made a Gaussian sample of width
    ``dim`` (``z_i``, tangent ``t_i``; a branch that is not one yet, or that shares its sample
    with another branch, draws its own independent ``G_i`` first, as an activation does);
    then ``phi' = prod_i z_i / sqrt(dim)`` and ``psi' = concat_i [t_i prod_{j != i} z_j] /
    sqrt(dim)``: ``E<phi', phi''> = prod_i K_i`` and ``E<psi', psi''> = sum_i T_i prod_{j != i}
    K_j`` (independent factors; the concatenation has no cross terms)."""

    def __init__(self, ctx: FeatureContext):
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
                z = chan_mix(self._draw(2 * i, (m, g.phi.shape[1]), g.phi), g.phi)
                t = None
                if g.psi is not None and self.ctx.want_ntk:
                    t = chan_mix(self._draw(2 * i + 1, (m, g.psi.shape[1]), g.psi), g.psi)
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
        return Feats(phi, torch.cat(psis, 1) if psis else None, False)


class FanOutOp(FeatureOp):
    def __init__(self, n):
        self.n = n

    def __call__(self, f):
        return (f,) * self.n


class ParallelOp(FeatureOp):
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, fs):
        if not isinstance(fs, tuple) or len(fs) != len(self.ops):
            raise ValueError(f"parallel with {len(self.ops)} branches needs {len(self.ops)} "
                             f"inputs; put FanOut({len(self.ops)}) before it")
        return tuple(op(f) for op, f in zip(self.ops, fs))


class FanInOp(FeatureOp):
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
        return Feats(phi, torch.cat(psis, 1) if psis else None, False)


def count_sketch(v: Tensor, out_dim: int, seed: int, out: Optional[Tensor] = None) -> Tensor:
    """Unbiased ``(n, D) -> (n, out_dim)`` compression: ``E <S a, S b> = <a, b>``; ``out``:
    add the sketch into this ``(n, out_dim)`` tensor instead of a new one."""
    g = generator(seed, 0, 7)
    d = v.shape[1]
    idx = torch.randint(0, out_dim, (d,), generator=g, device="cpu").to(v.device)
    sign = (torch.randint(0, 2, (d,), generator=g, device="cpu") * 2 - 1).to(
        device=v.device, dtype=v.dtype)
    if out is None:
        out = torch.zeros((v.shape[0], out_dim), dtype=v.dtype, device=v.device)
    return out.index_add_(1, idx, v * sign)
