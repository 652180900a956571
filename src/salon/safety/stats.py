"""Wilson score intervals: honest error bars for rates measured on a few hundred prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Rate:
    hits: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def __str__(self) -> str:
        interval = f"[{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{100 * self.value:.1f} % {interval} ({self.hits}/{self.total})"


def wilson(hits: int, total: int, z: float = Z95) -> Rate:
    """Wilson score interval; unlike the normal approximation it stays inside [0, 1] at 0 hits."""
    if total <= 0:
        return Rate(hits, total, 0.0, 1.0)
    p = hits / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # exact bounds at the edges (the formula gives them up to rounding error)
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == total else min(1.0, centre + half)
    return Rate(hits, total, low, high)
