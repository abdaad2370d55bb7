"""Global self-attention ``GlobalSelfAttention``: exact NNGP/NTK map and the finite ``nn.Module``.

Neural-tangents' ``stax.GlobalSelfAttention`` (Hron et al. 2020, "Infinite attention: NNGP and
NTK for deep attention networks") on ntkit's channels-first sequences ``(N, C, L)`` (or any
``(N, C, *spatial)``: all positions attend to all positions; NT's ``(N, L, C)`` is our
``x.transpose(1, 2)``). One head ``h`` of the finite layer, positions ``p, q``::

    G_h = QK_std / (C_k * d_k^s) * Q_h K_h^T            s = 1 (linear_scaling) or 1/2
    f(x) = OV_std / sqrt(d_v H C_v) * concat_h[mech(G_h) V_h] W_out + b_std * b

with ``Q_h = x W_Q``, ``K_h = x W_K``, ``V_h = x W_V`` (all weights ``N(0, 1)``: NTK
parameterization, as in NT), ``QK_std = W_query_std W_key_std``, ``OV_std = W_out_std
W_value_std``, ``mech`` = softmax over ``q`` / identity / abs / relu, and ``C_k``, ``C_v`` the
channels entering keys and values (inputs, plus positional embeddings for 'CONCAT').

Infinite width (channels, ``d_k``, ``d_v``, heads -> infinity), ``K`` the pixel-pair NNGP,
``T`` the NTK, ``c_i`` example ``i``'s self-covariance (all ``(P, P)`` per pair of examples):

* ``linear_scaling=True`` (NT's default; keys and queries tied): the logits converge to the
  deterministic ``QK_std * c_i``, so with ``A_i = mech(QK_std * c_i)`` (rows over ``q``)

      nngp'_ij = OV_std^2 A_i K_ij A_j^T + b_std^2
      ntk'_ij  = OV_std^2 A_i (T_ij + 2 K_ij) A_j^T + b_std^2

  (the 2: gradients of ``W_V`` and ``W_out``; the key/query gradients vanish in this limit).
  Every ``attention_mechanism`` has this closed form.
* ``linear_scaling=False`` (1/sqrt(d_k), independent keys and queries): the logits stay
  Gaussian; only ``'IDENTITY'`` has a closed form (``nngp'_ij = (QK OV)^2 <K_ij, K_ij> K_ij +
  b^2``, ``<.,.>`` the sum over all position pairs; the NTK adds the key/query gradients). The
  others raise ``ValueError`` (NT raises ``NotImplementedError``).

Positional embeddings (trainable, shared by all examples, covariance ``R`` over positions:
identity, or ``pos_emb_decay_fn(sum_d |p_d - q_d|^pos_emb_p_norm)``) enter keys/queries (and
values with ``val_pos_emb``) as ``K -> w_in K + w_pe R`` with ``(w_in, w_pe) = (1,
W_pos_emb_std^2)`` for 'SUM' and ``(C/(C+C_pe), W_pos_emb_std^2 C_pe/(C+C_pe))`` for 'CONCAT';
their gradients add ``w_pe R`` to the NTK where they are used.

Cost: needs the pixel-pair layout (like pooling); ``O(n1 n2 P^3)`` per layer (two batched
``P x P`` matrix products per pair of examples) plus ``O(n P^3)`` for the self-covariances.

Example (a transformer block on sequences ``(N, C, L)``)::

    >>> from ntkit import layers as nl
    >>> res = lambda *ls: nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(), nl.serial(*ls)),
    ...                             nl.FanInSum())
    >>> block = nl.serial(res(nl.GlobalSelfAttention(64, 64, 64, 4)), nl.LayerNorm(),
    ...                   res(nl.Dense(64), nl.Relu(), nl.Dense(64)), nl.LayerNorm())
    >>> arch = nl.serial(nl.Dense(64), block, block, nl.GlobalAvgPool(), nl.Dense(1))
    >>> k = arch.kernel(torch.randn(6, 3, 10))             # (6, 6) NNGP and NTK
    >>> net = arch.module((3, 10), width=256)              # the finite transformer
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .._validation import all_finite, check_int, check_positive, check_std
from ..kernel import Kernel
from ._base import BuildContext, Layer, frozen_layer
from ._masking import add_unmasked, unwrap, wrap
from ._ops import memo_self, set_batch_diag
from .conv import _spatial_kernel
from .dense import check_parameterization
from .pooling import _need_full

__all__ = ["GlobalSelfAttention", "ATTENTION_MECHANISMS", "POS_EMB_TYPES"]

ATTENTION_MECHANISMS = ("SOFTMAX", "IDENTITY", "ABS", "RELU")
POS_EMB_TYPES = ("NONE", "SUM", "CONCAT")
_NAME = "GlobalSelfAttention"


def _choice(value, allowed, name: str) -> str:
    """``value`` as one of ``allowed`` (case-insensitive; NT's enum values are upper case)."""
    v = getattr(value, "value", value)  # accept NT-style enums too
    if not isinstance(v, str) or v.upper() not in allowed:
        raise ValueError(f"{_NAME}: `{name}` must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")
    return v.upper()


def _mechanism(name: str, g: torch.Tensor, key_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """Attention weights from logits ``g (..., P, P)`` (softmax over the last axis).

    ``key_mask`` (broadcasting against ``g``, ``True`` = masked key): masked keys get no
    weight (softmax logit at the lowest float, as neural-tangents' ``-1e20``; weight 0 for the
    other mechanisms). A row whose keys are all masked gets uniform softmax weights (its
    values are zero)."""
    if key_mask is not None and bool(key_mask.any()):
        if name == "SOFTMAX":
            return torch.softmax(g.masked_fill(key_mask, torch.finfo(g.dtype).min), dim=-1)
        return _mechanism(name, g).masked_fill(key_mask, 0)
    if name == "SOFTMAX":
        return torch.softmax(g, dim=-1)
    if name == "IDENTITY":
        return g
    if name == "ABS":
        return g.abs()
    return g.clamp_min(0)



def _weigh_features(g, a1: torch.Tensor, a2: torch.Tensor, ov2: float, b2: float,
                    want_ntk: bool):
    """``ov2 A_i M_ij A_j^T + b2`` for the NNGP and the NTK when ``M`` is affine in a Gram
    matrix of features (:class:`~ntkit.kernel.GramFactors`: ``M_ij = a s^2 X_i^T X_j + b``,
    ``X_i`` ``(C, P)``, as after Dense layers on the inputs). Then ``A_i M_ij A_j^T = a Z_i^T
    Z_j + b r_i r_j^T`` with ``Z_i = X_i A_i^T`` and ``r_i = A_i 1``, and with the bias the
    whole map is one Gram matrix of ``C + 2`` channels per position: ``O(n1 n2 P^2 (C + 2))``
    instead of the sandwich's ``O(n1 n2 P^3)``, with no pixel-pair temporaries. Returns
    ``(nngp, ntk)`` as ``(n1, n2, P, P)`` (``ntk`` ``None`` when the NTK is not computed)."""
    def feats(f, a, coef):
        z = torch.bmm(f.to(a.dtype), a.transpose(1, 2))                   # (n, C, P)
        r = a.sum(2)[:, None, :]                                          # (n, 1, P)
        ca, cb = coef
        parts = [z * (g.fscale * math.sqrt(ov2 * ca)), r * math.sqrt(ov2 * cb)]
        if b2:
            parts.append(torch.full_like(r, math.sqrt(b2)))
        return torch.cat(parts, 1)

    def gram(coef):
        u = feats(g.f1, a1, coef)
        v = u if g.f2 is None else feats(g.f2, a2, coef)
        e = torch.einsum("icp,jcq->ijpq", u, v)
        return e.contiguous()

    nngp = gram(g.nngp_ab)
    ntk = None
    if want_ntk:   # the values' NTK: t + 2 kv (see _linear_map; t = 0 for ntk_ab None)
        ta, tb = g.ntk_ab if g.ntk_ab is not None else (0.0, 0.0)
        na, nb = g.nngp_ab
        ntk = gram((ta + 2 * na, tb + 2 * nb))
    return nngp, ntk


def _distances(spatial: Tuple[int, ...], p: float) -> torch.Tensor:
    """``sum_d |p_d - q_d|^p`` between all positions (row-major flattening), ``(P, P)``."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device="cpu")
                             for s in spatial],
                           indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], -1)   # (P, ndim)
    return (coords[:, None, :] - coords[None, :, :]).abs().pow(p).sum(-1)


def _pos_emb_cov_uncached(fn, p: float, spatial: Tuple[int, ...]) -> torch.Tensor:
    size = math.prod(spatial)
    if fn is None:
        return torch.eye(size, dtype=torch.float64, device="cpu")
    d = _distances(spatial, p)
    try:
        r = fn(d)
    except Exception as e:
        raise TypeError(f"{_NAME}: `pos_emb_decay_fn` must map a float64 torch tensor of "
                        f"distances elementwise (e.g. lambda d: torch.exp(-d / 4)); calling it "
                        f"failed with {type(e).__name__}: {e}") from None
    r = torch.as_tensor(r, dtype=torch.float64, device="cpu")
    if r.shape != d.shape or not all_finite(r):
        raise ValueError(f"{_NAME}: `pos_emb_decay_fn` must return finite values of the shape "
                         f"of its input {tuple(d.shape)}, got shape {tuple(r.shape)}")
    if not torch.allclose(r, r.T, rtol=1e-12, atol=0):
        raise ValueError(f"{_NAME}: `pos_emb_decay_fn` must act elementwise on the distances "
                         f"(its result is not symmetric)")
    ev = torch.linalg.eigvalsh(r)
    if float(ev.min()) < -1e-10 * max(float(ev.abs().max()), 1e-300):
        raise ValueError(f"{_NAME}: `pos_emb_decay_fn` gives positional-embedding covariances "
                         f"that are not positive semi-definite (smallest eigenvalue "
                         f"{float(ev.min()):.3g}), which no random embedding has; use a "
                         f"positive-definite decay such as lambda d: torch.exp(-d / scale) "
                         f"(with pos_emb_p_norm 1 or 2)")
    return r


@functools.lru_cache(maxsize=32)
def _pos_emb_cov_cached(fn, p, spatial):
    return _pos_emb_cov_uncached(fn, p, spatial)


def pos_emb_cov(fn, p: float, spatial: Tuple[int, ...]) -> torch.Tensor:
    """The ``(P, P)`` float64 covariance of the positional embeddings (identity for
    ``fn=None``). Cached per ``(fn, p, spatial)``; callers must not modify it."""
    try:
        hash(fn)
    except TypeError:
        return _pos_emb_cov_uncached(fn, p, spatial)
    return _pos_emb_cov_cached(fn, p, tuple(spatial))


@functools.lru_cache(maxsize=32)
def _pos_emb_cov_on_cached(fn, p, spatial, dtype, device):
    return _pos_emb_cov_cached(fn, p, spatial).to(dtype=dtype, device=device)


def pos_emb_cov_on(fn, p: float, spatial: Tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """:func:`pos_emb_cov` (computed on the CPU, where ``fn`` is documented to run) in
    ``dtype`` on ``device``, cached so that tiles on an accelerator do not copy it from the host
    each time. Callers must not modify it."""
    try:
        hash(fn)
    except TypeError:
        return _pos_emb_cov_uncached(fn, p, spatial).to(dtype=dtype, device=device)
    return _pos_emb_cov_on_cached(fn, p, tuple(spatial), dtype, torch.device(device))


class SelfAttentionModule(nn.Module):
    """Finite global self-attention over ``(N, C, *spatial)`` with NT's initialization and
    scaling (NTK parameterization; see the module docstring for the formula)."""

    def __init__(self, layer: "GlobalSelfAttention", in_shape: Tuple[int, ...], n_out: int,
                 d_key: int, d_val: int, n_heads: int, ctx: BuildContext):
        super().__init__()
        g, dt = ctx.generator, ctx.dtype
        c = in_shape[0]
        self.spatial = tuple(in_shape[1:])
        self.mechanism, self.pos_emb_type = layer.attention_mechanism, layer.pos_emb_type
        self.linear_scaling, self.val_pos_emb = layer.linear_scaling, layer.val_pos_emb
        self.qk_std = layer.W_query_std * layer.W_key_std
        self.ov_std = layer.W_out_std * layer.W_value_std
        self.b_std, self.W_pos_emb_std = layer.b_std, layer.W_pos_emb_std
        self.n_heads, self.d_key, self.d_val, self.n_out = n_heads, d_key, d_val, n_out
        c_pe = 0
        if self.pos_emb_type == "SUM":
            c_pe = c
        elif self.pos_emb_type == "CONCAT":
            c_pe = c if layer.n_chan_pos_emb is None else layer.n_chan_pos_emb
        c_key = c + (c_pe if self.pos_emb_type == "CONCAT" else 0)
        c_val = c_key if (self.val_pos_emb and self.pos_emb_type == "CONCAT") else c
        self.c_key, self.c_val = c_key, c_val

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=dt, device=ctx.device)

        self.w_key = nn.Parameter(rand(n_heads, c_key, d_key))
        self.w_query = None if self.linear_scaling else nn.Parameter(rand(n_heads, c_key, d_key))
        self.w_value = nn.Parameter(rand(n_heads, c_val, d_val))
        self.w_out = nn.Parameter(rand(n_out, n_heads * d_val))
        self.bias = None if self.b_std is None else nn.Parameter(rand(n_out))
        self.pos_emb = None
        if self.pos_emb_type != "NONE":
            self.pos_emb = nn.Parameter(rand(c_pe, *self.spatial))
            if layer.pos_emb_decay_fn is not None:
                # any factor F with F F^T = R gives embeddings of covariance R
                r = pos_emb_cov(layer.pos_emb_decay_fn, layer.pos_emb_p_norm, self.spatial)
                ev, u = torch.linalg.eigh(r)
                self.register_buffer("pos_emb_factor", (u * ev.clamp_min(0).sqrt()).to(dt))
            else:
                self.pos_emb_factor = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, m = unwrap(x)
        return wrap(self._forward(x, m), m)

    def _forward(self, x: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        """``m``: position mask ``(n, *spatial)`` or ``None``: masked positions get no
        positional embedding and are not attended to (neural-tangents)."""
        if tuple(x.shape[2:]) != self.spatial:
            raise ValueError(f"{_NAME} module was built for positions {self.spatial}, got "
                             f"inputs of shape {tuple(x.shape)}")
        n = x.shape[0]
        xf = x.flatten(2)                                   # (n, C, P)
        xk = xv = xf
        if self.pos_emb is not None:
            pe = self.pos_emb.flatten(1)                    # (C_pe, P)
            if self.pos_emb_factor is not None:
                pe = pe @ self.pos_emb_factor.T
            pe = pe * self.W_pos_emb_std
            if m is not None:  # (n, C_pe, P): no embedding at masked positions
                pe = pe.unsqueeze(0) * (~m.reshape(n, 1, -1)).to(pe.dtype)
            if self.pos_emb_type == "SUM":
                xk = xf + pe
            else:
                xk = torch.cat([xf, pe.expand(n, -1, -1) if pe.ndim == 2 else pe], 1)
            if self.val_pos_emb:
                xv = xk
        keys = torch.einsum("ncp,hcd->nhpd", xk, self.w_key)
        queries = keys if self.w_query is None else torch.einsum("ncp,hcd->nhpd", xk,
                                                                 self.w_query)
        norm = self.c_key * (self.d_key if self.linear_scaling else math.sqrt(self.d_key))
        logits = queries @ keys.transpose(-1, -2) * (self.qk_std / norm)
        mk = None if m is None else m.reshape(n, 1, 1, -1)  # masked keys
        weights = _mechanism(self.mechanism, logits, mk)    # (n, H, P, P)
        values = torch.einsum("ncp,hcv->nhpv", xv, self.w_value)
        heads = (weights @ values).permute(0, 2, 1, 3).reshape(n, xf.shape[2], -1)
        out = heads @ self.w_out.T * (self.ov_std / math.sqrt(self.d_val * self.n_heads *
                                                              self.c_val))
        if self.bias is not None:
            assert self.b_std is not None  # the bias exists only when b_std is given
            out = out + self.b_std * self.bias
        return out.transpose(1, 2).reshape((n, self.n_out) + self.spatial)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, d_key={self.d_key}, d_val={self.d_val}, "
                f"out={self.n_out}, mechanism={self.mechanism!r}, "
                f"linear_scaling={self.linear_scaling}, pos_emb={self.pos_emb_type!r}")


@frozen_layer
class GlobalSelfAttention(Layer):
    """``GlobalSelfAttention(n_chan_out, n_chan_key, n_chan_val, n_heads, linear_scaling=True,
    W_key_std=1.0, W_value_std=1.0, W_query_std=1.0, W_out_std=1.0, b_std=None,
    attention_mechanism='SOFTMAX', pos_emb_type='NONE', pos_emb_p_norm=2,
    pos_emb_decay_fn=None, n_chan_pos_emb=None, W_pos_emb_std=1.0, val_pos_emb=False,
    parameterization='ntk')``: neural-tangents' global self-attention over all positions of
    ``(N, C, *spatial)`` inputs (sequences ``(N, C, L)``; NT's ``(N, L, C)`` transposed).

    Args (names, defaults and meaning as in NT's stax; see the module docstring for the maps):
      n_chan_out, n_chan_key, n_chan_val, n_heads: sizes of the finite layer (the kernel is
        their infinite limit and does not depend on them).
      linear_scaling: ``True``: logits scaled by ``1/n_chan_key`` with tied key/query weights
        (closed form for every mechanism); ``False``: ``1/sqrt(n_chan_key)`` and independent
        weights (closed-form kernel only for ``'IDENTITY'``; the finite module exists for all).
      W_key_std, W_query_std: enter only through ``W_key_std * W_query_std``.
      W_value_std, W_out_std: enter only through ``W_value_std * W_out_std``.
      b_std: output bias standard deviation (``None``: no bias).
      attention_mechanism: ``'SOFTMAX'`` (over the attended positions), ``'IDENTITY'``,
        ``'ABS'`` or ``'RELU'`` (case-insensitive).
      pos_emb_type: ``'NONE'``, ``'SUM'`` (added to the inputs; ``n_chan_pos_emb`` must be
        ``None`` or the input channels) or ``'CONCAT'`` (appended as extra channels).
      pos_emb_p_norm, pos_emb_decay_fn: embedding covariance between positions ``p, q`` is
        ``pos_emb_decay_fn(sum_d |p_d - q_d|^pos_emb_p_norm)``; ``None``: independent
        embeddings per position (identity). The function receives a float64 torch tensor
        (write ``torch.exp``, not ``jnp.exp``) and must give a positive semi-definite matrix.
      n_chan_pos_emb: embedding channels for 'CONCAT' (``None``: as many as the inputs); sets
        the input/embedding mix ``C / (C + n_chan_pos_emb)``.
      W_pos_emb_std: embedding standard deviation.
      val_pos_emb: whether values also see the embeddings (keys/queries always do).
      parameterization: only ``'ntk'`` (NT's attention has no standard parameterization).

    Finite network (``.module``): weights ``N(0, 1)`` scaled as in NT; the embeddings are
    trainable parameters (their gradients are part of the NTK). ``module(width=w)`` sets
    ``n_chan_key = n_chan_val = w`` (and ``n_chan_out = w`` when a linear layer follows) for
    ``linear_scaling=True``, and ``n_heads = w`` (and ``n_chan_out``) for
    ``linear_scaling=False``, whose limit needs infinitely many heads (each head's logits stay
    random).

    Example::

        >>> arch = serial(Dense(64), GlobalSelfAttention(64, 64, 64, 4), Relu(),
        ...               GlobalAvgPool(), Dense(1))
        >>> arch.kernel(torch.randn(4, 3, 7), get='ntk').shape     # sequences (N, C, L)
        torch.Size([4, 4])
    """
    collapses_mask_channels = True
    n_chan_out: int
    n_chan_key: int
    n_chan_val: int
    n_heads: int
    linear_scaling: bool = True
    W_key_std: float = 1.0
    W_value_std: float = 1.0
    W_query_std: float = 1.0
    W_out_std: float = 1.0
    b_std: Optional[float] = None
    attention_mechanism: str = "SOFTMAX"
    pos_emb_type: str = "NONE"
    pos_emb_p_norm: float = 2
    pos_emb_decay_fn: Optional[Callable] = None
    n_chan_pos_emb: Optional[int] = None
    W_pos_emb_std: float = 1.0
    val_pos_emb: bool = False
    parameterization: str = "ntk"

    supports_masking = True  # masked keys get no attention, no positional embedding (NT)

    def keeps_masked_zeros(self) -> bool:
        # the closed form with linear scaling zeroes masked queries' weights and adds the bias
        # only where no position is masked (_linear_map); exact type only
        return type(self) is GlobalSelfAttention and self.linear_scaling

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        raise NotImplementedError(
            "features(method='rf'): no random-feature rule for GlobalSelfAttention (its "
            "infinite-width attention weights are a nonlinear function of each example's "
            "pixel-pair covariance, not a map of the feature columns); use "
            "method='jacobian' (the sketched Jacobian of a finite network) or arch.kernel")

    def __post_init__(self):
        for name in ("n_chan_out", "n_chan_key", "n_chan_val", "n_heads"):
            check_int(getattr(self, name), name)
        if self.n_chan_pos_emb is not None:
            check_int(self.n_chan_pos_emb, "n_chan_pos_emb")
        for name in ("linear_scaling", "val_pos_emb"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{_NAME}: `{name}` must be True or False, got "
                                f"{getattr(self, name)!r}")
        for name in ("W_key_std", "W_value_std", "W_query_std", "W_out_std", "W_pos_emb_std"):
            check_std(getattr(self, name), name)
        if self.b_std is not None:
            check_std(self.b_std, "b_std", allow_zero=True)
        object.__setattr__(self, "attention_mechanism", _choice(
            self.attention_mechanism, ATTENTION_MECHANISMS, "attention_mechanism"))
        object.__setattr__(self, "pos_emb_type", _choice(self.pos_emb_type, POS_EMB_TYPES,
                                                         "pos_emb_type"))
        check_positive(self.pos_emb_p_norm, "pos_emb_p_norm")
        if self.pos_emb_decay_fn is not None and not callable(self.pos_emb_decay_fn):
            raise TypeError(f"{_NAME}: `pos_emb_decay_fn` must be None or a function of the "
                            f"distances, got {self.pos_emb_decay_fn!r}")
        check_parameterization(self.parameterization)
        if self.parameterization != "ntk":
            raise ValueError(f"{_NAME}: `parameterization` must be 'ntk' (neural-tangents' "
                             f"attention is NTK-parameterized only: all its weights are N(0, 1) "
                             f"scaled by std/sqrt(fan_in)); got {self.parameterization!r}")

    # ---- shapes / structure -------------------------------------------------------------
    @property
    def has_linear(self) -> bool:
        return True

    def needs_full_spatial(self, above: bool) -> bool:
        return True

    def _check_in_shape(self, in_shape, channels: bool = True) -> None:
        if len(in_shape) < 2:
            raise ValueError(f"{_NAME} needs inputs (C, *spatial), e.g. sequences (N, C, L), "
                             f"got per-example shape {tuple(in_shape)}; for a single token "
                             f"use x[:, :, None]")
        if channels and self.pos_emb_type == "SUM" and \
                self.n_chan_pos_emb not in (None, in_shape[0]):
            raise ValueError(f"{_NAME}: pos_emb_type='SUM' adds the embeddings to the inputs, "
                             f"so `n_chan_pos_emb` must be None or the input channels "
                             f"{in_shape[0]}, got {self.n_chan_pos_emb}; use "
                             f"pos_emb_type='CONCAT' for a different embedding width")

    def out_shape(self, in_shape: Any) -> Any:
        self._check_in_shape(in_shape)
        return (self.n_chan_out,) + tuple(in_shape[1:])

    def _check_closed_form(self) -> None:
        if not self.linear_scaling and self.attention_mechanism != "IDENTITY":
            raise ValueError(
                f"{_NAME}(linear_scaling=False, attention_mechanism="
                f"{self.attention_mechanism!r}) has no closed-form infinite-width kernel (with "
                f"1/sqrt(n_chan_key) scaling the attention logits stay Gaussian inside the "
                f"{self.attention_mechanism.lower()}; neural-tangents raises too). Use "
                f"linear_scaling=True (tied keys/queries, 1/n_chan_key scaling: closed form for "
                f"every mechanism) or attention_mechanism='IDENTITY'. The finite network "
                f"(.module()) exists for every setting, for Monte Carlo estimates")

    def _pos_weights(self, c: int) -> Tuple[float, float]:
        """``(w_in, w_pe)``: keys see ``w_in K + w_pe R``."""
        pe2 = self.W_pos_emb_std ** 2
        if self.pos_emb_type == "CONCAT":
            c_pe = c if self.n_chan_pos_emb is None else self.n_chan_pos_emb
            return c / (c + c_pe), pe2 * c_pe / (c + c_pe)
        return 1.0, pe2

    # ---- kernel map ---------------------------------------------------------------------
    def kernel_map(self, k: Kernel) -> Kernel:
        k = _spatial_kernel(k, _NAME)
        _need_full(k, _NAME)
        self._check_in_shape(k.shape1)
        self._check_closed_form()
        c, sp = k.shape1[0], tuple(k.shape1[1:])
        npos = math.prod(sp)
        assert k.nngp is not None  # the recursion always carries the NNGP
        dt = k.nngp.dtype
        like: Dict[str, Any] = dict(dtype=dt, device=k.nngp.device)
        use_pe = self.pos_emb_type != "NONE"
        w_in, w_pe = self._pos_weights(c)
        r = pos_emb_cov_on(self.pos_emb_decay_fn, float(self.pos_emb_p_norm), sp, dt,
                           k.nngp.device) if use_pe else None

        # position masks (n, P) of the two blocks (None: no masking)
        m1 = None if k.mask1 is None else k.mask1.reshape(k.mask1.shape[0], npos)
        m2 = m1 if k.mask2 is None or m1 is None else k.mask2.reshape(k.mask2.shape[0], npos)

        def interp(t, ma=None, mb=None):
            """Keys' covariance: inputs mixed with the embeddings; with masks ``ma`` (rows)
            and ``mb`` (columns; ``None``: a self-covariance, ``mb = ma``) the embeddings are
            zero at masked positions."""
            if not use_pe:
                return t
            rr = r
            if ma is not None:
                if mb is None:
                    rr = r.masked_fill(ma[:, :, None] | ma[:, None, :], 0)
                else:
                    rr = r.masked_fill(ma[:, None, :, None] | mb[None, :, None, :], 0)
            if t is None:
                return w_pe * rr
            return (w_in * t).add_(rr, alpha=w_pe) if rr is r else w_in * t + w_pe * rr

        def pairs(t, batch_ndim):  # (batch, *S, *S) -> (batch, P, P)
            return None if t is None else t.reshape(t.shape[:batch_ndim] + (npos, npos))

        key = ("attention", self, tuple(k.shape1))
        if self.linear_scaling:
            out = self._linear_map(k, pairs, interp, key, m1, m2)
        else:
            out = self._identity_sqrt_map(k, pairs, interp, key, m1, m2)
        nngp, ntk, cov1, cov2 = out   # (the self-maps return cov1 / cov2 shaped already:
        tail = sp + sp                 # the memo's tensors, which later layers key on)
        nngp = nngp.reshape(nngp.shape[:2] + tail)
        ntk = None if ntk is None else ntk.reshape(ntk.shape[:2] + tail)
        if k.cov2 is None:  # exact batch diagonal
            set_batch_diag(nngp, cov1)
        shape = (self.n_chan_out,) + sp
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape1=shape,
                         shape2=(self.n_chan_out,) + tuple(k.shape2[1:]), is_gaussian=True)

    def _linear_map(self, k, pairs, interp, key, m1=None, m2=None):
        qk, ov2 = self.W_query_std * self.W_key_std, (self.W_out_std * self.W_value_std) ** 2
        b2 = (self.b_std or 0.0) ** 2
        val_pe = self.val_pos_emb

        # With masks, the rows of masked queries get zero weights and the bias goes only where
        # no position is masked: the outputs are then zero at every covariance involving a
        # masked position, which the remask after the layer would otherwise write (a pass and
        # a fresh array per tile; see keeps_masked_zeros).
        def self_map_for(m, which):
            def self_map(cov):  # -> (attention weights (n, P, P), output self-covariance)
                c = pairs(cov, 1)
                ci = interp(c, m)
                a = _mechanism(self.attention_mechanism, ci * qk,
                               None if m is None else m[:, None, :])
                if m is not None:
                    a = a.masked_fill(m[:, :, None], 0)
                cv = ci if val_pe else c
                out = (a @ cv @ a.transpose(-1, -2)).mul_(ov2).reshape(cov.shape)
                if b2:
                    if m is None:
                        out.add_(b2)
                    else:
                        add_unmasked(out, b2, k, which)
                return a, out
            return self_map

        a1, cov1 = memo_self(key, k.cov1, self_map_for(m1, "self1"))
        a2, cov2 = (a1, None) if k.cov2 is None else \
            memo_self(key, k.cov2, self_map_for(m2, "self2"))

        def weigh(m):  # ov2 * A_i m_ij A_j^T + b2
            # einsum contracts pairwise as two large batched GEMMs (A_i against all of row i,
            # then each A_j): 1.2-1.7x faster than the broadcast `A_i @ m @ A_j^T`, whose
            # (n1, n2) batch of 24 x 24 products runs one small GEMM per pair
            e = torch.einsum("iab,ijbc,jdc->ijad", a1, m, a2)
            # (einsum hands back a j-major view; the scaling writes it contiguously, else every
            # later map copies it first: 13 of 140 ms per call in the bench's attention case)
            out = torch.mul(e, ov2, out=torch.empty(e.shape, dtype=e.dtype, device=e.device))
            if not b2:
                return out
            if m1 is None:
                return out.add_(b2)
            tail = tuple(k.nngp.shape[2:])  # (the kernel's own pixel-pair layout)
            return add_unmasked(out.reshape(out.shape[:2] + tail), b2, k, "cross").reshape(
                out.shape)

        g = None if val_pe or m1 is not None else k.valid_gram()
        if g is not None:
            return (*_weigh_features(g, a1, a2, ov2, b2, k.want_ntk), cov1, cov2)
        kv = pairs(k.nngp, 2)
        if val_pe:
            kv = interp(kv, m1, m2)
        nngp = weigh(kv)
        ntk = None
        if k.want_ntk:
            t = pairs(k.ntk, 2)
            if val_pe:  # the embeddings' own gradients reach the output through the values
                t = interp(t, m1, m2)
            s = kv * 2 if t is None else t + 2 * kv
            ntk = weigh(s)
        return nngp, ntk, cov1, cov2

    def _identity_sqrt_map(self, k, pairs, interp, key, m1=None, m2=None):
        std2 = (self.W_query_std * self.W_key_std * self.W_out_std * self.W_value_std) ** 2
        b2 = (self.b_std or 0.0) ** 2
        val_pe = self.val_pos_emb

        def both(t, ma=None, mb=None):  # (keys' covariance, values' covariance)
            ti = interp(t, ma, mb)
            return ti, (ti if val_pe else t)

        def dot(a, b):  # sum over all position pairs, kept as (..., 1, 1)
            return (a * b).sum((-2, -1), keepdim=True)

        def self_map_for(m):
            def self_map(cov):
                ci, cv = both(pairs(cov, 1), m)
                out = (dot(ci, cv) * ci).mul_(std2)
                if b2:
                    out.add_(b2)
                return out.reshape(cov.shape)
            return self_map

        cov1 = memo_self(key, k.cov1, self_map_for(m1))
        cov2 = None if k.cov2 is None else memo_self(key, k.cov2, self_map_for(m2))
        ki, kv = both(pairs(k.nngp, 2), m1, m2)
        d12 = dot(ki, kv)
        nngp = (d12 * ki).mul_(std2)
        if b2:
            nngp.add_(b2)
        ntk = None
        if k.want_ntk:
            t = pairs(k.ntk, 2)
            ti = interp(t, m1, m2)     # keys' NTK (None: zero)
            tv = ti if val_pe else t   # values' NTK
            cross = 0.0
            if tv is not None:
                cross = cross + dot(ki, tv)
            if ti is not None:
                cross = cross + dot(ti, kv)
            inner = 4 * ki if ti is None else ti + 4 * ki
            ntk = (cross * ki + d12 * inner).mul_(std2)
            if b2:
                ntk.add_(b2)
        return nngp, ntk, cov1, cov2

    # ---- finite module ------------------------------------------------------------------
    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        w = ctx.width
        self._check_in_shape(in_shape, channels=w is None)  # width may resize C
        n_out = self.n_chan_out if (w is None or not followed) else w
        d_key, d_val, heads = self.n_chan_key, self.n_chan_val, self.n_heads
        if w is not None:
            if self.linear_scaling:
                d_key = d_val = w
            else:
                heads = w
            if self.pos_emb_type == "CONCAT" and self.n_chan_pos_emb is not None:
                raise ValueError(
                    f"{_NAME}: module(width=...) may resize the input channels C but not "
                    f"n_chan_pos_emb={self.n_chan_pos_emb}, which would change the "
                    f"input/embedding mix C / (C + n_chan_pos_emb) the kernel uses; build with "
                    f"width=None (the widths written in the architecture) or use "
                    f"n_chan_pos_emb=None (as many embedding channels as inputs)")
        mod = SelfAttentionModule(self, tuple(in_shape), n_out, d_key, d_val, heads, ctx)
        return mod, (n_out,) + tuple(in_shape[1:])
