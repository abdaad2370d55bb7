"""Inputs padded with ``mask_constant`` for the functions that run the finite network on them
(``monte_carlo_kernel``, ``features(method='jacobian')``, ``compute_kernel``).

Why: ``arch.kernel(x, mask_constant=c)`` finds the padding by comparing ``x`` with ``c`` in
``x``'s *own* dtype, before converting it, and accepts ``NaN`` / ``inf`` padding. A caller that
first converts ``x`` (``as_tensor(x, dtype=...)``) and only then lets the network compare could
find other entries (``float32(0.1) != 0.1`` once in float64) or refuse NaN padding as
non-finite. :func:`masked_input` converts ``x`` with the padding found beforehand and checks that
the converted tensor marks exactly the same entries.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .._validation import as_tensor
from ._masking import _raw

__all__ = ["mask_hits", "masked_input", "finite_stand_in"]


def mask_hits(t: torch.Tensor, c: float) -> torch.Tensor:
    """Boolean tensor of the entries of ``t`` equal to ``c`` (``NaN`` matches ``NaN``), compared
    in ``t``'s dtype, as :func:`ntkit.layers._masking.input_masks` compares."""
    if math.isnan(c):
        return torch.isnan(t) if t.is_floating_point() else torch.zeros_like(t, dtype=torch.bool)
    return t == c


def masked_input(x: Any, name: str, dtype: Optional[torch.dtype], c: float) -> torch.Tensor:
    """``x`` as a checked ``dtype`` tensor (:func:`ntkit._validation.as_tensor`) whose entries
    equal to ``c`` are exactly those of ``x`` as given (``c`` a checked mask constant).

    The padding is excluded from the finiteness check (``NaN``/``inf`` constants), and a
    conversion that would make another entry equal ``c`` (e.g. float64 data rounded to float32)
    is refused with a ``ValueError`` instead of silently masking it.

    Example: ``masked_input(x64, 'x', torch.float32, -1e9)`` -> ``(n, ...)`` float32 tensor."""
    raw = _raw(x, name)
    hit = mask_hits(raw, c)
    any_hit = bool(hit.any())
    t = as_tensor(raw.masked_fill(hit, 0) if any_hit else raw, name, dtype)
    if any_hit:
        t = t.masked_fill(hit.to(t.device), c)
    if not torch.equal(mask_hits(t, c), hit.to(t.device)):
        raise ValueError(
            f"`{name}` converted to {t.dtype} has entries equal to mask_constant={c!r} that "
            f"differ from it in the input's own dtype {raw.dtype} (or the reverse): the padding "
            f"would change with the conversion. Pass `{name}` in the working dtype, use "
            f"dtype=torch.float64, or pick a constant the data never comes close to (e.g. -1e9)")
    return t


def finite_stand_in(xs: Sequence[Optional[torch.Tensor]], c: float
                    ) -> Tuple[List[Optional[torch.Tensor]], float]:
    """``(xs with the padding set to c', c')``: the same padding marked by a finite constant
    ``c'`` (``c`` itself when finite), for code that refuses non-finite inputs (e.g.
    ``ntkit.empirical_ntk``). The network masks exactly the same entries with ``c'`` as with
    ``c`` (``c'`` exceeds every other entry in absolute value), so its outputs are the same.

    Example: ``finite_stand_in([x1, x2], float('nan'))`` -> ``([x1', x2'], 7.0)``."""
    if math.isfinite(c):
        return list(xs), c
    given = [x for x in xs if x is not None]
    top = 0.0
    for x in given:
        rest = x[~mask_hits(x, c)]
        if rest.numel():
            top = max(top, float(rest.abs().max()))
    stand = torch.tensor(2.0 * top + 1.0, dtype=given[0].dtype, device="cpu")  # a host scalar
    if not bool(torch.isfinite(stand)):
        raise ValueError(f"mask_constant={c!r}: the inputs are too large ({top:g}) to mark "
                         f"their padding with a finite stand-in in {given[0].dtype}; rescale "
                         f"them")
    cs = float(stand)
    out: List[Optional[torch.Tensor]] = []
    for xi in xs:
        if xi is None:
            out.append(None)
            continue
        h = mask_hits(xi, c)
        y = xi.masked_fill(h, cs)
        if not torch.equal(mask_hits(y, cs), h):  # pragma: no cover - cs exceeds every entry
            raise RuntimeError("internal error: the finite mask stand-in marks other entries")
        out.append(y)
    return out, cs
