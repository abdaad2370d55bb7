"""Small text helpers shared by the report, the figures and the demo (no ntkit imports)."""
from __future__ import annotations

from typing import Optional

__all__ = ["plural"]


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``'1 hidden layer'``, ``'3 hidden layers'`` (``many``: an irregular plural).

    Example: ``plural(2, 'GD step') -> '2 GD steps'``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
