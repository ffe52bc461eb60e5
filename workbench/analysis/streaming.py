"""Streaming statistics: memory stays constant however many tokens pass through."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Welford:
    """Running count, mean and M2 of a stream of scalars (batched, Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def update_moments(self, n_b: int, total: float, total_sq: float) -> None:
        """Merge a batch given by its count, sum and sum of squares (float64 sums)."""
        if n_b == 0:
            return
        mean_b = total / n_b
        m2_b = max(total_sq - total * mean_b, 0.0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n else float("nan")


class LogHistogram:
    """Counts of positive values in log-spaced bins: quantiles within one bin (≈1 % relative)."""

    def __init__(self, lo: float = 1e-12, hi: float = 1e12, bins_per_decade: int = 250) -> None:
        self.log_lo = math.log10(lo)
        self.per_decade = bins_per_decade
        self.n_bins = int(round((math.log10(hi) - self.log_lo) * bins_per_decade))
        self.counts = torch.zeros(self.n_bins + 2, dtype=torch.float64)  # [under, bins..., over]

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        idx = ((x.clamp_min(1e-300).log10() - self.log_lo) * self.per_decade).floor().long() + 1
        self.counts += torch.bincount(idx.clamp(0, self.n_bins + 1), minlength=self.n_bins + 2).double()

    def quantile(self, q: float) -> float:
        total = self.counts.sum().item()
        if total == 0:
            return float("nan")
        k = int(torch.searchsorted(self.counts.cumsum(0), torch.tensor(q * total, dtype=torch.float64)))
        k = min(max(k, 1), self.n_bins)
        return 10 ** (self.log_lo + (k - 0.5) / self.per_decade)  # bin centre (geometric)
