"""The architecture node: every layer (and every combination of layers) is a :class:`Layer`.

A layer knows three things, all derived from one definition:

* ``kernel_map(k) -> k'``: how the exact infinite-width NNGP/NTK change through it;
* ``build(in_shape, ctx, followed) -> (module, out_shape)``: the finite ``nn.Module`` it stands
  for, with the parameterization and initialization the kernel map assumes;
* ``out_shape(in_shape)``.

Any layer is an architecture: ``layer.kernel(x1, x2)`` evaluates the kernel tile by tile
(upper triangle only when ``x2`` is ``None``) and ``layer.module(in_shape)`` builds the network.

Call-time arguments (neural-tangents' ``kernel_fn(x1, x2, get, **kwargs)`` /
``apply_fn(params, x, **kwargs)``, e.g. the graph ``pattern`` of :class:`~ntkit.layers.Aggregate`):
a layer lists the names it reads in ``call_args``; ``arch.kernel(x1, x2, pattern=(p1, p2))`` and
``net(x, pattern=p)`` accept exactly the names some layer of the architecture reads. The values
are per-example arrays (leading axis = batch), sliced with ``x1`` / ``x2`` tile by tile, and a
layer reads the current ``(value for x1 block, value for x2 block or None)`` with
:func:`call_arg` inside ``kernel_map`` / its module's ``forward``. Other layers never see them.

Masking (neural-tangents' ``mask_constant``): ``arch.kernel(x1, x2, mask_constant=c)`` and
``net(x, mask_constant=c)`` treat positions whose channels all equal ``c`` as padding (so do
``ntkit.monte_carlo_kernel``, ``ntkit.features(method='jacobian')`` and
``ntkit.scale.compute_kernel``); see :mod:`ntkit.layers._masking`. A layer opts in with ``supports_masking = True`` (and
:meth:`Layer.mask_map` when it changes the positions); the others refuse masks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple,
                    TypeVar, Union, overload)

import numpy as np
import torch
from torch import nn

from .._system import available_memory  # re-exported: ntkit.layers._base.available_memory
from .._validation import (as_tensor, check_int, parse_get, parse_memory_budget,
                           remembering_extremes)
from ..kernel import Kernel
from ._calls import (CallArgsModule, accepted_call_args, apply_kernel_map, call_arg,
                     check_call_arg_pair, is_masked, prepare_call_args, slice_call_args,
                     using_call_args)
from ._feature_ops import SeqOp
from ._features import features as _features
from . import _fc_chain
from . import _masking   # (keeps_zeros / remask looked up at call time: tests switch them)
from ._masking import (MASK_ARG, check_mask_constant, check_supported, collapses_channels,
                       input_masks, mask_post_hook, mask_pre_hook, module_info, refusal)
from ._tiling import evaluate

__all__ = ["Layer", "BuildContext", "KernelLike", "available_memory", "DEFAULT_DTYPE",
           "call_arg", "accepted_call_args", "Serial", "serial"]

DEFAULT_DTYPE = torch.float64
KernelLike = Union[Kernel, Tuple[Kernel, ...]]
# several kernel keys (``get`` other than one string): a Kernel record or a dict comes back
_Keys = Union[Tuple[str, ...], List[str], None]
Shape = Tuple[int, ...]


@dataclass
class BuildContext:
    """What building a finite network needs besides the architecture."""
    width: Optional[int] = None
    generator: Optional[torch.Generator] = None
    dtype: torch.dtype = DEFAULT_DTYPE

    @property
    def device(self) -> torch.device:
        """Where parameters are drawn: the generator's device (the CPU for ``Layer.module``),
        whatever torch's default device is (``torch.set_default_device('cuda')`` would
        otherwise put them where the CPU generator cannot draw)."""
        return torch.device("cpu") if self.generator is None else self.generator.device


class Layer:
    """Base class of architecture nodes (immutable; subclasses are frozen dataclasses)."""

    #: names of the call-time keyword arguments this layer reads (see :func:`call_arg`)
    call_args: Tuple[str, ...] = ()
    #: whether the layer honours ``mask_constant`` (neural-tangents' masking); the others
    #: refuse it with a ValueError naming themselves (:mod:`ntkit.layers._masking`)
    supports_masking: bool = False

    # ---- to be provided by subclasses -------------------------------------------------
    def kernel_map(self, k: KernelLike) -> KernelLike:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no kernel map")

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no finite module")  # pragma: no cover

    def out_shape(self, in_shape: Any) -> Any:
        return in_shape

    @property
    def has_linear(self) -> bool:
        """Whether the layer contains a trainable linear map (Dense/Conv)."""
        return False

    def needs_full_spatial(self, above: bool) -> bool:
        """Whether the representation *entering* this layer must keep pixel-pair covariances,
        given whether the layers above need it (``above``). Default: pass through."""
        return above

    # ---- what the shared machinery asks of a layer (answered by the class itself, so that
    # the tiler, the masking and the feature maps never dispatch on layer types) ----------
    #: a fully-connected network is made of such layers only (Dense, activations, LayerNorm,
    #: the combinators): ``arch.kernel`` refuses spatial inputs for an architecture of them
    fully_connected: bool = False
    #: the layer collapses the channel axis of input masks when it comes first (Dense, Conv,
    #: GlobalSelfAttention): partially masked positions are then allowed (as in NT)
    collapses_mask_channels: bool = False
    #: ``method='rf'`` features read this layer's call-time arguments exactly (Aggregate)
    rf_reads_call_args: bool = False
    #: the layer's random-feature rule wants a Gaussian sample as input (activations): the
    #: Dense layer before it then samples its output instead of mapping it exactly
    samples_features: bool = False

    def keeps_masked_zeros(self) -> bool:
        """Whether the kernel map keeps a kernel that is zero at masked positions zero there,
        masks unchanged (then no remask is needed; see :func:`ntkit.layers._masking.keeps_zeros`).
        Default ``False``: always remask."""
        return False

    def chain_stage(self, in_shape: Any, dtype: torch.dtype) -> Optional[Tuple[int, Tuple[float, ...]]]:
        """This layer as one stage of a fused fully-connected run
        (:mod:`ntkit.layers._fc_chain`: Dense and dual maps entry by entry, one pass per tile):
        ``(code, numbers)`` as :func:`ntkit.layers._fused.fc_chain` reads them (code ``-1``: an
        exact identity, skipped), for inputs of
        per-example shape ``in_shape`` computed in ``dtype`` (raising what the kernel map would
        raise for that dtype). Default ``None``: the layer runs its own kernel map."""
        return None

    def chain_self(self, cov: torch.Tensor, k: Kernel) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(self-covariance after this layer, dot or None)`` for a fused run's per-example
        chain, through the tile memo under the key this layer's kernel map uses (so both paths
        share it). Only called for layers whose :meth:`chain_stage` is not ``None``."""
        raise NotImplementedError(f"{type(self).__name__} is not a fused-run stage")

    def inner_shapes(self, in_shape: Any) -> List[Any]:
        """Per-example shapes of the values inside this layer, its output last (``serial``
        and ``parallel`` list their layers' own): the tiler sizes a tile's working set by the
        largest (an upsampling layer makes later arrays larger than the inputs)."""
        return [self.out_shape(in_shape)]

    def first_layer(self) -> "Layer":
        """The first leaf layer the inputs meet (``serial`` descends into its first layer)."""
        return self

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        """``(op, out_shape)``: this layer's step of the random-feature map (``method='rf'``,
        :mod:`ntkit.layers._feature_ops`), compiled once for inputs of per-example shape
        ``in_shape``; ``followed_by_act``: whether an activation comes next (a Dense layer then
        samples its output). Layers without a rule refuse by name."""
        raise NotImplementedError(
            f"features: no random-feature rule for {type(self).__name__}; supported: Dense, "
            f"Conv, ConvTranspose, ConvLocal, activations, AvgPool, SumPool, GlobalAvgPool, "
            f"GlobalSumPool, Flatten, LayerNorm, ImageResize, Index, DotGeneral, Aggregate, "
            f"Dropout(mode='test'), Identity, FanOut, parallel, FanInSum, FanInConcat, FanInProd; "
            f"use method='jacobian' (the sketched Jacobian of a finite network) for the others")

    # ---- masking (mask_constant) --------------------------------------------------------
    def mask_map(self, mask: Any, in_shape: Any) -> Any:
        """Output position mask ``(n, *S_out)`` (``(n,)`` when FC) from the input one
        ``(n, *S_in)`` (neural-tangents' ``mask_fn``); default: unchanged (position-wise
        layers). Only called when :attr:`supports_masking`."""
        return mask

    def masked_kernel_map(self, k: KernelLike) -> KernelLike:
        """``kernel_map`` of a kernel that carries masks (``k.mask1`` set): the layer's own
        map (layers that pool / attend read ``k.mask1`` / ``k.mask2`` there), then the output
        masks (:meth:`mask_map`) and the covariances of masked positions set to zero (every
        layer's input is zeroed at masked positions). Refuses layers without mask support."""
        if not self.supports_masking:
            raise refusal(self)
        if isinstance(k, tuple):
            return self.kernel_map(k)  # the layer reports that it needs one branch
        out = self.kernel_map(k)
        assert isinstance(out, Kernel)  # one branch in, one out (tuples handled above)
        m1 = self.mask_map(k.mask1, k.shape1)
        m2 = None if k.mask2 is None else self.mask_map(k.mask2, k.shape2)
        out = out.replace(mask1=m1, mask2=m2)
        if m1 is k.mask1 and m2 is k.mask2 and _masking.keeps_zeros(self):
            return out  # k is zero at masked positions and the layer keeps it so: no remask
        return _masking.remask(out, key=(self, tuple(out.shape1)))

    # ---- architecture API ------------------------------------------------------------
    # The return type follows `get`: one (n1, n2) tensor for a string, a Kernel record for a
    # tuple/list of keys or None (the default). Overloads tell type checkers so.
    @overload
    def kernel(self, x1: Any, x2: Any = ..., *, get: str,
               dtype: Optional[torch.dtype] = ..., memory_budget: Union[int, float, str, None] = ...,
               progress: bool = ..., tile: Optional[int] = ..., mask_constant: Optional[float] = ...,
               **kwargs: Any) -> torch.Tensor: ...

    @overload
    def kernel(self, x1: Any, x2: Any, get: str, *,
               dtype: Optional[torch.dtype] = ..., memory_budget: Union[int, float, str, None] = ...,
               progress: bool = ..., tile: Optional[int] = ..., mask_constant: Optional[float] = ...,
               **kwargs: Any) -> torch.Tensor: ...

    @overload
    def kernel(self, x1: Any, x2: Any = ..., get: _Keys = ..., *,
               dtype: Optional[torch.dtype] = ..., memory_budget: Union[int, float, str, None] = ...,
               progress: bool = ..., tile: Optional[int] = ..., mask_constant: Optional[float] = ...,
               **kwargs: Any) -> Kernel: ...

    def kernel(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = ("nngp", "ntk"),
               *, dtype: Optional[torch.dtype] = None,
               memory_budget: Union[int, float, str, None] = None,
               progress: bool = False, tile: Optional[int] = None,
               mask_constant: Optional[float] = None,
               **kwargs: Any) -> Union[torch.Tensor, Kernel]:
        """Exact infinite-width kernels of this architecture between ``x1`` and ``x2``.

        Args:
          x1: ``(n1, d)`` (or ``(n1, C, *spatial)``) tensor or array.
          x2: ``(n2, ...)`` with the same per-example shape, or ``None`` for ``x2 = x1``: then only
            the upper triangle of tiles is computed and the diagonal is exact.
          get: ``'nngp'``, ``'ntk'`` (returns that ``(n1, n2)`` tensor) or a tuple of them (returns
            a :class:`~ntkit.Kernel` record with ``.nngp`` / ``.ntk``). Only what is asked for is
            computed (the NTK recursion needs the NNGP, not the reverse).
          dtype: dtype of the recursion; default ``float64`` (float32 loses angles near the
            diagonal). ``torch.float32`` is about 2x faster.
          memory_budget: bytes the computation may use (default: half the available RAM): a
            positive number of bytes or a string with a unit, ``'512MB'``, ``'2GiB'``.
          progress: show a progress bar over tiles.
          tile: override the tile edge (examples per block); chosen automatically otherwise.
          **kwargs: call-time arguments read by layers of the architecture (neural-tangents'
            ``kernel_fn(..., **kwargs)``), e.g. ``pattern=(pattern1, pattern2)`` for
            :class:`~ntkit.layers.Aggregate`: per-example arrays, batch on the leading axis;
            ``pattern=p`` when ``x2`` is ``None``. A name no layer reads is a ``TypeError``.
          mask_constant: neural-tangents' masking for variable-length inputs: a position of
            ``x1`` / ``x2`` (``x[n, :, p]``; a whole example for FC inputs ``(n, d)``) whose
            channels all equal ``mask_constant`` (``float('nan')`` matches NaN) is padding:
            its entries are zeroed, every layer sees it as zero, ``GlobalAvgPool`` averages
            over the other positions only, ``GlobalSelfAttention`` does not attend to it and
            ``LayerNorm`` over spatial axes ignores it; ``Conv`` / pooling mask an output when
            its window's centre is masked; ``Flatten`` and ``AvgPool`` count masked positions
            as zeros. So a per-position network followed by ``GlobalAvgPool`` gives the
            kernel of the unpadded sequences. ``net(x, mask_constant=c)`` runs the finite
            network the same way. Layers without these semantics (``ConvTranspose``,
            ``Index``, ``Dropout``, ...) raise ``ValueError`` naming themselves. See
            :mod:`ntkit.layers._masking`.

        Returns ``(n1, n2)`` kernels (empty when ``x1`` or ``x2`` has no rows). Raises
        ``ValueError`` when the architecture's output keeps spatial axes (add ``Flatten()``),
        when the inputs have no features, and when the kernel is not representable in
        ``dtype`` (overflow, or variances below the smallest normal number): never ``inf``,
        ``NaN`` or a silently imprecise number.

        Example::

            >>> arch = serial(Dense(512), Relu(), Dense(1))
            >>> arch.kernel(torch.randn(5, 3), get='ntk').shape
            torch.Size([5, 5])
        """
        keys, single = parse_get(get)
        if isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor) \
                and x2.device != x1.device:
            raise ValueError(f"`x1` is on {x1.device} but `x2` on {x2.device}; the kernel is "
                             f"computed where the inputs are: move both to one device, e.g. "
                             f"x2.to(x1.device)")
        memory_budget = parse_memory_budget(memory_budget)
        if tile is not None:
            tile = check_int(tile, "tile")
        dtype = DEFAULT_DTYPE if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
        masks: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        if mask_constant is not None:
            mask_constant = check_mask_constant(mask_constant)
            check_supported(self)
            collapse = collapses_channels(self)
            x1, m1 = input_masks(collapse, x1, mask_constant, "x1")
            m2: Optional[torch.Tensor] = None
            if x2 is not None:
                x2, m2 = input_masks(collapse, x2, mask_constant, "x2")
            masks = (m1, m2)
        with remembering_extremes():   # (the input Gram's scaling reuses the input check's)
            return self._kernel(x1, x2, keys, single, dtype, memory_budget, progress, tile,
                                mask_constant, masks, kwargs)

    def _kernel(self, x1, x2, keys, single, dtype, memory_budget, progress, tile, mask_constant,
                masks, kwargs):
        x1 = as_tensor(x1, "x1", dtype)
        x2 = None if x2 is None else as_tensor(x2, "x2", dtype)
        if 0 in x1.shape[1:]:
            raise ValueError(f"`x1` has per-example shape {tuple(x1.shape[1:])} with no features "
                             f"(a zero-length axis); the kernel needs inputs (n, d) or "
                             f"(n, C, *spatial) with d, C and every spatial size >= 1")
        if x2 is not None and x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"`x2` per-example shape {tuple(x2.shape[1:])} does not match `x1` "
                             f"{tuple(x1.shape[1:])}; both must be (n, *feature_shape)")
        call_args = prepare_call_args(self, kwargs, x1.shape[0],
                                      None if x2 is None else x2.shape[0]) if kwargs else None
        if call_args:  # per-example arguments (graphs) go to the inputs' device once, not per tile
            call_args = {n: (a.to(x1.device), None if b is None else b.to(x1.device))
                         for n, (a, b) in call_args.items()}
        if mask_constant is not None:
            ma, mb = masks
            assert ma is not None
            call_args = dict(call_args or {})
            call_args[MASK_ARG] = (ma.to(x1.device), None if mb is None else mb.to(x1.device))
        return evaluate(self, x1, x2, keys, single, memory_budget=memory_budget,
                        progress=progress, tile=tile, call_args=call_args)

    @overload
    def features(self, x: Any, dim: int = ..., get: str = ..., **kwargs: Any) -> torch.Tensor: ...

    @overload
    def features(self, x: Any, dim: int = ..., *, get: _Keys,
                 **kwargs: Any) -> Dict[str, torch.Tensor]: ...

    @overload
    def features(self, x: Any, dim: int, get: _Keys,
                 **kwargs: Any) -> Dict[str, torch.Tensor]: ...

    def features(self, x: Any, dim: int = 1024, get: Union[str, Sequence[str], None] = "ntk",
                 **kwargs: Any) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Random features ``phi`` with ``phi(x1) @ phi(x2).T ~= self.kernel(x1, x2, get)``
        (error ~ ``dim^-1/2``); see :func:`ntkit.features.features` for the arguments.

        Example::

            >>> phi = serial(Dense(512), Relu(), Dense(1)).features(torch.randn(5, 3), 4096)
            >>> phi.shape
            torch.Size([5, 8194])
        """
        return _features(self, x, dim, get, **kwargs)

    def module(self, in_shape: Union[int, Sequence[int]], width: Optional[int] = None,
               seed: Optional[int] = None, dtype: torch.dtype = DEFAULT_DTYPE) -> nn.Module:
        """The finite network this architecture describes.

        Args:
          in_shape: per-example input shape, ``d`` or ``(C, *spatial)``.
          width: if given, replaces the width (``out_dim`` / ``out_chan``) of every Dense/Conv
            layer that is followed by another one (all but the readout).
          seed: seed for the initialization (parameters drawn i.i.d. from the distribution the
            kernel assumes: ``N(0, 1)`` in NTK parameterization, ``N(0, W_std^2 / fan_in)`` in
            standard parameterization).
          dtype: parameter dtype.

        When layers read call-time arguments (``Aggregate``'s ``pattern``), the network is
        wrapped so that ``net(x, pattern=p)`` passes them on (the network itself is ``net.net``).
        ``net(x, mask_constant=c)`` masks padded positions as :meth:`kernel` does (the output
        is zero at masked positions); layers without mask support refuse it.

        Example::

            >>> net = serial(Dense(512), Relu(), Dense(1)).module(3, width=2048, seed=0)
            >>> net(torch.randn(4, 3, dtype=torch.float64)).shape
            torch.Size([4, 1])
        """
        if isinstance(in_shape, int):
            in_shape = (in_shape,)
        in_shape = tuple(int(s) for s in in_shape)
        if not in_shape or any(s < 1 for s in in_shape):
            raise ValueError(f"`in_shape` must be positive sizes (d,) or (C, *spatial), "
                             f"got {in_shape}")
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ValueError(f"`width` must be a positive integer, got {width!r}")
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        mod, _ = self.build(in_shape, BuildContext(width, gen, dtype), followed=False)
        names = accepted_call_args(self)
        top = CallArgsModule(mod, names) if names else mod
        top.__dict__["_ntkit_mask_info"] = module_info(self)  # read by the hooks
        top.register_forward_pre_hook(mask_pre_hook, with_kwargs=True)
        top.register_forward_hook(mask_post_hook, with_kwargs=True)
        return top

    # ---- structure ------------------------------------------------------------------
    def children(self) -> Tuple["Layer", ...]:
        """The layers directly inside this one (``serial``/``parallel``'s ``layers``), in order.

        Read from the declared dataclass fields: a field holding a :class:`Layer`, or a tuple /
        list of them. A leaf layer (``Dense``, ``Relu``, ...) has none.

        Example: ``serial(Dense(8), Relu()).children() == (Dense(8), Relu())``.
        """
        if not dataclasses.is_dataclass(self):
            return ()
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name, None)
            if isinstance(v, Layer):
                out.append(v)
            elif isinstance(v, (tuple, list)):
                out.extend(s for s in v if isinstance(s, Layer))
        return tuple(out)

    def walk(self) -> Iterator["Layer"]:
        """This layer and every layer inside it, depth-first in definition order (pre-order:
        a combinator comes before its children).

        Why: code that asks "does any layer ...?" (dropout noise, parameterization, call-time
        arguments, fully-connected) walks the architecture through this one method instead
        of guessing attribute names.

        Example::

            >>> [type(l).__name__ for l in serial(Dense(8), parallel(Erf(), Dense(2))).walk()]
            ['Serial', 'Dense', 'Parallel', 'Erf', 'Dense']
        """
        stack = [self]
        while stack:
            layer = stack.pop()
            yield layer
            stack.extend(reversed(layer.children()))

    # ---- conveniences ----------------------------------------------------------------
    def __rshift__(self, other: "Layer") -> "Layer":
        return serial(self, other)


if TYPE_CHECKING:   # so type checkers see a @frozen_layer class's dataclass __init__
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_kwargs: Any) -> Callable[[Any], Any]:
        return lambda f: f

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, eq_default=True)
def frozen_layer(cls: type[_T]) -> type[_T]:
    """Decorator: make a Layer subclass an immutable dataclass with value equality."""
    return dataclass(frozen=True, repr=True, eq=True)(cls)


# ---- serial: the composition every architecture is made of (``a >> b``) --------------

def check_layer(layer, where: str):
    if not isinstance(layer, Layer):
        raise TypeError(f"{where} expects ntkit layers, got {type(layer).__name__}: {layer!r}")
    return layer


@frozen_layer
class Serial(Layer):
    """Layers applied one after another (built with :func:`serial`)."""
    layers: Tuple[Layer, ...]
    supports_masking = True
    fully_connected = True

    def kernel_map(self, k: KernelLike) -> KernelLike:
        layers, i = self.layers, 0
        while i < len(layers):
            run = _fc_chain.run_length(layers, i, k)
            if run:  # fully-connected Dense/activation layers: one fused pass per tile
                assert isinstance(k, Kernel)  # (run_length admits single records only)
                k = _fc_chain.apply_run(layers[i:i + run], k)
                i += run
                continue
            k = apply_kernel_map(layers[i], k)
            i += 1
        return k

    def masked_kernel_map(self, k: KernelLike) -> KernelLike:
        return self.kernel_map(k)  # each child masks (or refuses) itself

    def out_shape(self, in_shape: Any) -> Any:
        for layer in self.layers:
            in_shape = layer.out_shape(in_shape)
        return in_shape

    @property
    def has_linear(self) -> bool:
        return any(layer.has_linear for layer in self.layers)

    def needs_full_spatial(self, above: bool) -> bool:
        for layer in reversed(self.layers):
            above = layer.needs_full_spatial(above)
        return above

    def first_layer(self) -> Layer:
        return self.layers[0].first_layer() if self.layers else self

    def inner_shapes(self, in_shape: Any) -> List[Any]:
        out: List[Any] = []
        for layer in self.layers:
            out += layer.inner_shapes(in_shape)
            in_shape = layer.out_shape(in_shape)
        return out

    def feature_op(self, in_shape: Any, ctx: Any, followed_by_act: bool) -> Tuple[Any, Any]:
        ops = []
        for i, sub in enumerate(self.layers):
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            act_next = (nxt.first_layer().samples_features if nxt is not None
                        else followed_by_act)
            op, in_shape = sub.feature_op(in_shape, ctx, act_next)
            ops.append(op)
        return SeqOp(ops), in_shape

    def build(self, in_shape: Any, ctx: BuildContext, followed: bool) -> Tuple[nn.Module, Any]:
        mods = []
        for i, layer in enumerate(self.layers):
            after = followed or any(l.has_linear for l in self.layers[i + 1:])
            mod, in_shape = layer.build(in_shape, ctx, after)
            mods.append(mod)
        return nn.Sequential(*mods), in_shape


def serial(*layers: Layer) -> Serial:
    """Compose layers in sequence: ``serial(Dense(512), Relu(), Dense(1))``."""
    if not layers:
        raise ValueError("serial() needs at least one layer")
    flat: List[Layer] = []
    for layer in layers:
        check_layer(layer, "serial()")
        flat.extend(layer.layers if isinstance(layer, Serial) else (layer,))
    return Serial(tuple(flat))
