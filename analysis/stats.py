"""Mean and 95% confidence interval over seeds (Student's t), and paired ablation deltas."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # the CI is mean +- half_width; nan when n < 2
    n: int

    def text(self, digits: int = 2) -> str:
        if self.n == 0:
            return "not run"
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n=1, no CI)"
        return f"{self.mean:+.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean and the half-width of its two-sided `level` t-interval: t(n-1) * s / sqrt(n)."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n)


def paired_deltas(variant: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """variant - baseline for every seed both have (the same seed: same data order and init)."""
    return [variant[seed] - baseline[seed] for seed in sorted(variant) if seed in baseline]
