"""Architecture specification: one definition gives the exact kernels and the finite network.

Vocabulary follows neural-tangents' stax::

    >>> from ntkit import layers as nl
    >>> arch = nl.serial(nl.Dense(512, W_std=1.5, b_std=0.05), nl.Relu(),
    ...                  nl.Dense(512, W_std=1.5, b_std=0.05), nl.Erf(),
    ...                  nl.Dense(1, W_std=1.5))
    >>> k = arch.kernel(x1, x2, get=('nngp', 'ntk'))   # exact infinite-width kernels
    >>> net = arch.module(in_shape=x1.shape[1])        # the finite network they describe
"""
from ._base import Layer
# engine seams for monte_carlo / scale (not in __all__): the call-time argument plumbing
from ._calls import CallArgsModule as CallArgsModule
from ._calls import check_call_arg_pair as check_call_arg_pair
from ._calls import prepare_call_args as prepare_call_args
# ... and the masking plumbing (mask_constant) for the same callers
from ._mask_inputs import finite_stand_in as finite_stand_in
from ._mask_inputs import masked_input as masked_input
from ._masking import check_mask_constant as check_mask_constant
from ._masking import check_supported as check_supported
from ._masking import collapses_channels as collapses_channels
from ._masking import input_masks as input_masks
from ._masking import mask_pre_hook as mask_pre_hook
from ._masking import unwrap as unwrap
from .activations import (ABRelu, Abs, Activation, Cos, Elementwise, Erf, Exp, Gaussian, Gelu,
                          Hermite, LeakyRelu, Monomial, Polynomial, Rbf, RectifiedMonomial, Relu,
                          Sigmoid_like, Sign, Sin)
from .combinators import (FanInConcat, FanInProd, FanInSum, FanOut, Identity, parallel, repeat,
                          serial)
from .conv import Conv
from .conv_variants import ConvLocal, ConvTranspose, ImageResize
from .dense import Dense
from .normalization import LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from .attention import GlobalSelfAttention
from .graph import Aggregate
from .activations import ExpNormalized, Gabor
from .misc import DotGeneral, Dropout, Index, Slice
from ._parse import parse_arch
from ._from_torch import from_torch
# engine seams for ntkit.features and ntkit.scale (not in __all__; public there, machinery
# here): the random-feature map and the tile working-set constant
from ._features import feature_dim as feature_dim
from ._features import features as features
from ._tiling import LIVE_ARRAYS as LIVE_ARRAYS
from ._tiling import max_pixels as max_pixels

__all__ = [
    "Layer", "serial", "parallel", "repeat", "FanOut", "FanInSum", "FanInConcat", "FanInProd",
    "Identity",
    "Dense", "LayerNorm", "Conv", "AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool",
    "Flatten", "Aggregate",
    "Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sigmoid_like", "Gelu", "Sin", "Cos",
    "Gaussian", "Exp", "Rbf", "Sign", "Monomial", "RectifiedMonomial", "Polynomial", "Hermite",
    "Elementwise", "Activation", "parse_arch", "from_torch",
    "Gabor", "ExpNormalized", "Dropout", "Index", "Slice", "DotGeneral",
    "ConvTranspose", "ConvLocal", "ImageResize",
    "GlobalSelfAttention",
]
