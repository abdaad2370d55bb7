"""``arch.features(x, dim)``: random features whose inner products approximate the exact
kernel, ``phi(x1) @ phi(x2).T ~= arch.kernel(x1, x2)`` -- the entry point, argument checks,
chunking, and ``method='jacobian'`` (the sketched Jacobian of one finite network).

``method='rf'`` compiles the architecture once into feature operations, each layer supplying
its own (:meth:`ntkit.layers.Layer.feature_op`, built from :mod:`ntkit.layers._feature_ops`,
where the construction is described), and applies them chunk by chunk. This module knows
layers only through that hook, ``walk()`` and ``module()``, so it sits below the layer families.
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._system import available_memory
from .._validation import all_finite, as_tensor, check_int, parse_get, parse_memory_budget
from ._calls import prepare_call_args, using_call_args
from ._feature_ops import FeatureContext, Feats, count_sketch
from ._mask_inputs import masked_input
from ._masking import Masked, check_mask_constant, check_supported, unwrap
from . import _stencil as st

if TYPE_CHECKING:
    from ._base import Layer

__all__ = ["features", "feature_dim"]

Tensor = torch.Tensor


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

    def __init__(self, arch: "Layer", in_shape, dim: int, seed: int, dtype, device,
                 frozen: Sequence[int] = (), readout: str = "gaussian"):
        self.net = arch.module(tuple(in_shape), width=dim, seed=seed, dtype=dtype).to(device)
        self.net.requires_grad_(True)
        # Dense and Conv modules say what their Jacobian is (``jacobian_kind``)
        self.mods: List[Any] = [m for m in self.net.modules()
                                if getattr(m, "jacobian_kind", None) in ("conv", "affine")]
        if readout == "sign":
            # the signs of the readout's Gaussian weights: a Rademacher readout. The tangent
            # kernel is quadratic in the readout weights v and its mean sees only E[v_k v_l] =
            # delta_kl (the same for both), while each hidden unit's weight v_k^2 is now 1
            # rather than chi-square (E v^4 = 1 instead of 3): the same mean, less variance
            with torch.no_grad():
                self.mods[-1].weight.sign_()
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
        if m.jacobian_kind == "conv":
            # sum_p delta_p (x) patch_p, one batched product per filter offset (F.unfold's
            # im2col is ~20x slower on CPU than these strided views)
            x = st.pad_input(inp, m.pads, m.circular)
            out_sp = tuple(delta.shape[2:])
            d = delta.reshape(n, delta.shape[1], -1)
            gw = x.new_empty((n, delta.shape[1], x.shape[1]) + tuple(m.filt))
            if len(out_sp) == 2 and tuple(m.strides) == (1, 1):
                # 2-D, stride 1: on the padded image flattened row by row, the patches at
                # offset (i, j) are the contiguous run starting at i Wp + j when the output
                # grid is widened to Wp columns (delta zero in the extra ones): every product
                # reads strided views, no copies (~6% more multiply-adds at 32 x 32)
                x = x.contiguous()
                (hh, ww), wp = out_sp, x.shape[3]
                run = (hh - 1) * wp + ww
                dx = delta.new_zeros((n, delta.shape[1], hh, wp))
                dx[..., :ww] = delta
                dx = dx.reshape(n, delta.shape[1], -1)[:, :, :run]
                xf = x.reshape(n, x.shape[1], -1)
                for i, j in itertools.product(range(m.filt[0]), range(m.filt[1])):
                    st0 = i * wp + j
                    gw[:, :, :, i, j] = torch.bmm(dx, xf[:, :, st0:st0 + run].transpose(1, 2))
                gw = gw.reshape(n, -1).mul_(m.w_scale)
                out = [gw]
                if m.bias is not None:
                    out.append(d.sum(2).mul_(m.b_scale))
                return out
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
                # only the layers whose parameters count (and the readout for 'nngp'): a
                # frozen first layer's output needs no backward pass through the layer above
                want = [i for i, r in enumerate(recs)
                        if self.mods.index(r[0]) not in self.frozen
                        or ("nngp" in keys and i == len(recs) - 1)]
                got = torch.autograd.grad(y.reshape(y.shape[0], -1)[:, 0].sum(),
                                          [outs[i] for i in want], allow_unused=True
                                          ) if want else ()
                deltas: List[Optional[Tensor]] = [None] * len(recs)
                for i, g in zip(want, got):
                    deltas[i] = g
        finally:
            for h in handles:
                h.remove()
        res: Dict[str, Tensor] = {}
        last, last_out = recs[-1][0], final[0]
        if "nngp" in keys:
            if last.jacobian_kind == "conv" or last_out.shape != y.shape or not bool(
                    (last_out == y).all()):
                raise ValueError("features(method='jacobian', get='nngp') needs an architecture "
                                 "ending in a Dense readout; use method='rf'")
            d_last = deltas[-1]
            assert d_last is not None     # the readout's output is y: requested, never unused
            res["nngp"] = self._sketch(torch.cat(self._grads(last, recs[-1][1], d_last), 1),
                                       out_dim, 10 ** 6)
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
                        count_sketch(g, out_dim, self.seed * 7919 + 2 * i + j, out=acc)
                res["ntk"] = acc
        return res

    def trained_size(self) -> int:
        """Raw NTK columns: the parameters of the layers that are not ``frozen``."""
        return sum(s for i, s in enumerate(self.sizes) if i not in self.frozen)

    def _sketch(self, g: Tensor, out_dim: Optional[int], part: int) -> Tensor:
        if out_dim is None or out_dim >= g.shape[1]:
            return g
        return count_sketch(g, out_dim, self.seed * 7919 + part)


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
    if not all_finite(t):
        raise ValueError(
            f"the {key} features overflow {xb.dtype} (non-finite values): the kernel grows too "
            f"fast with the input scale or depth; rescale `x`, lower W_std, or use "
            f"dtype=torch.float64")


def _parse_budget(memory_budget, device=None) -> int:
    """Bytes for one chunk's work: the given budget, else half of what is free where ``x``
    lives (RAM, or the GPU's memory for CUDA inputs)."""
    budget = parse_memory_budget(memory_budget)
    return available_memory(device) // 2 if budget is None else int(budget)


def features(arch: "Layer", x: Any, dim: int = 1024, get: Union[str, Sequence[str], None] = "ntk", *,
             seed: int = 0, method: str = "rf", out_dim: Optional[int] = None,
             dtype: torch.dtype = torch.float32, memory_budget: Optional[int] = None,
             chunk: Optional[int] = None, progress: bool = False,
             mask_constant: Optional[float] = None, frozen: Sequence[int] = (),
             readout: str = "gaussian",
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
      readout: ``method='jacobian'`` only: ``'gaussian'`` (default: the network as
        ``arch.module(width=dim, seed=seed)`` builds it) or ``'sign'`` (its readout weights
        replaced by their signs, a Rademacher readout). The NTK estimate keeps its mean (the
        readout weights enter it through ``E[v_k v_l] = delta_kl`` only) and loses the
        chi-square weighting ``v_k^2`` of the hidden units, so its variance drops (for one
        trained hidden layer by ``(E v^4 - 1)``: 2 -> 0 in the readout's share). On 20,000
        CIFAR-10 images (width 128, ``frozen=(0, -1)``): +0.5 test / +1.4 validation points.
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
    if not callable(getattr(arch, "feature_op", None)):
        raise TypeError(f"`arch` must be an ntkit.layers architecture, got {type(arch).__name__}")
    if method not in ("rf", "jacobian"):
        raise ValueError(f"`method` must be 'rf' (random features of the network and its "
                         f"tangent) or 'jacobian' (sketched Jacobian of a random finite "
                         f"network), got {method!r}")
    if readout not in ("gaussian", "sign"):
        raise ValueError(f"`readout` must be 'gaussian' or 'sign' (a Rademacher readout), got "
                         f"{readout!r}")
    if readout != "gaussian" and method != "jacobian":
        raise ValueError(f"readout={readout!r} changes the network whose Jacobian "
                         f"method='jacobian' takes; method={method!r} has no readout weights")
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
                          if set(sub.call_args) & set(args) and not sub.rf_reads_call_args})
        if readers:
            raise NotImplementedError(
                f"features(method='rf') has no random-feature rule for {', '.join(readers)} "
                f"(which read the call-time arguments {sorted(args)}); use method='jacobian' (the "
                f"sketched Jacobian of a finite network run as "
                f"net(x, {', '.join(f'{n}=...' for n in args)}))")
    budget = _parse_budget(memory_budget, x.device)
    want_ntk = "ntk" in keys
    ctx = FeatureContext(dim, seed, want_ntk)
    jac = op = None
    _refuse_standard(arch)   # both maps: the layer-wise random network is NTK-parameterized
    if method == "rf":
        op, out_shape = arch.feature_op(tuple(x.shape[1:]), ctx, False)
    else:
        out_shape = arch.out_shape(tuple(x.shape[1:]))
        jac = _JacobianMap(arch, x.shape[1:], dim, seed, dtype, x.device, frozen, readout)
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
            f = op(Feats(xb / math.sqrt(c), None, False)).normed()
        res = {}
        for key in keys:
            t = f.phi if key == "nngp" else f.psi
            if t is None:   # an NTK that is identically zero (no trainable layer)
                t = torch.zeros((xb.shape[0], 1), dtype=xb.dtype, device=xb.device)
            t = t.reshape(xb.shape[0], -1)
            _check_finite(t, key, xb)
            if out_dim is not None and out_dim < t.shape[1]:
                t = count_sketch(t, out_dim, seed)
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


def feature_dim(arch: "Layer", in_shape: Union[int, Sequence[int]], dim: int,
                get: str = "ntk", **call_args: Any) -> int:
    """Number of columns :func:`features` returns for inputs of per-example shape ``in_shape``
    (``**call_args``: one example's call-time arguments, e.g. ``pattern=a[:1]`` for
    :class:`~ntkit.layers.Aggregate`)."""
    x = torch.zeros((1,) + tuple((in_shape,) if isinstance(in_shape, int) else in_shape))
    return int(features(arch, x + 1, dim, get, **call_args).shape[1])
