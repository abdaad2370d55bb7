"""Input checks and small tensor helpers shared by the diagnostics modules.

Everything here works on a float64 view of the data: :func:`_as_x` / :func:`_as_y` check and
convert inputs, :func:`_f64_copy` gives a private float64 copy of a model (the user's model is
never modified by a measurement), :func:`_full_ntk` the ``(N, N)`` empirical NTK ``J J^T`` in the
order of ``model(x).reshape(-1)``.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from .._validation import all_finite, check_int, check_model
from ..empirical import empirical_ntk

_F64 = torch.float64


def _check_model(model: Any, name: str = "model") -> nn.Module:
    """A module with a trainable parameter: :func:`ntkit._validation.check_model`."""
    return check_model(model, name, trainable=True)


def _as_x(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
            x = torch.as_tensor(np.asarray(x))
        except Exception:
            raise TypeError(f"`{name}` must be a tensor (n, ...), got {type(x).__name__}") from None
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty batch (n, ...), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got {x.dtype}")
    x = x.detach().to(_F64)
    if not all_finite(x):
        raise ValueError(f"`{name}` contains NaN/Inf values")
    return x


def _as_y(y: Any, out_shape: torch.Size, name: str = "y") -> torch.Tensor:
    y = torch.as_tensor(y).detach().to(_F64)
    if y.shape != out_shape:
        if y.numel() == math.prod(out_shape):
            y = y.reshape(out_shape)
        else:
            raise ValueError(f"`{name}` has shape {tuple(y.shape)} but the model outputs "
                             f"{tuple(out_shape)} on x; pass targets of the output's shape "
                             f"(for one output: y[:, None])")
    if not all_finite(y):
        raise ValueError(f"`{name}` contains NaN/Inf values")
    return y


def _f64_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    return m.to(_F64)


def _trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


_check_int = check_int          # one integer check (ntkit._validation) for every module


def _full_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J J^T`` as an ``(N, N)`` matrix in the order of ``model(x).reshape(-1)``."""
    k = empirical_ntk(model, x, output="full", dtype=_F64)        # (n, n, k, k)
    n, kk = k.shape[0], k.shape[2]
    return k.permute(0, 2, 1, 3).reshape(n * kk, n * kk)



def _param_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().to(_F64).clone() for n, p in _trainable(model)}

