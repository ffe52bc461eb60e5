"""Seeds → error bars: Student-t intervals of a mean, and paired comparisons between norms.

With a handful of seeds a bootstrap interval is meaningless (three values have ten resamples), so the
interval of a mean is the textbook one, x̄ ± t_{0.975, n−1} · s/√n, and "A beats B" is a paired t-test
on the per-seed differences: the same seed gives both models the same batches in the same order, so
the difference removes the data-order noise the two runs share. Everything here is pure arithmetic on
lists of numbers; the tables are tidy (one row per norm × metric, or per pair × metric).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import pandas as pd

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom: 1 − ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; |error| < 1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Iterable[float], level: float = LEVEL) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and the Student-t interval x̄ ± t·s/√n (None below 2 values)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> dict:
    """A − B over the seeds both have: mean difference, its t-interval, the paired t-test's two-sided p
    and whether the interval excludes 0 (``excludes_zero``; None below 2 shared seeds)."""
    shared = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    diffs = [float(a[k]) - float(b[k]) for k in shared]
    out = {**mean_interval(diffs, level), "seeds": shared, "p": None, "excludes_zero": None}
    if out["n"] >= 2:
        sd, n = out["sd"], out["n"]
        if sd == 0:
            out["p"] = 0.0 if out["mean"] != 0 else 1.0
        else:
            t = out["mean"] / (sd / math.sqrt(n))
            out["p"] = 2.0 * (1.0 - t_cdf(abs(t), n - 1))
        out["excludes_zero"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def seed_table(per_seed: Mapping[str, Mapping[int, Mapping[str, float | None]]], metrics: Iterable[str],
               level: float = LEVEL) -> pd.DataFrame:
    """Tidy rows (model, metric, n, mean, sd, lo, hi, values) from ``{model: {seed: {metric: value}}}``."""
    rows = []
    for model, seeds in per_seed.items():
        for metric in metrics:
            values = [seeds[k].get(metric) for k in sorted(seeds)]
            rows.append({"model": model, "metric": metric, **mean_interval(values, level),
                         "values": [v for v in values]})
    return pd.DataFrame(rows, columns=["model", "metric", "n", "mean", "sd", "lo", "hi", "values"])


def paired_table(per_seed: Mapping[str, Mapping[int, Mapping[str, float | None]]], metrics: Iterable[str],
                 pairs: Iterable[tuple[str, str]] | None = None, level: float = LEVEL) -> pd.DataFrame:
    """Tidy rows (a, b, metric, n, mean, lo, hi, p, excludes_zero) of the paired differences A − B; every
    ordered pair of models once (a before b in ``per_seed``'s order) unless ``pairs`` names them."""
    names = list(per_seed)
    pairs = list(pairs) if pairs is not None else [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    rows = []
    for a, b in pairs:
        for metric in metrics:
            d = paired_difference({k: v.get(metric) for k, v in per_seed[a].items()},
                                  {k: v.get(metric) for k, v in per_seed[b].items()}, level)
            rows.append({"a": a, "b": b, "metric": metric, **{k: d[k] for k in ("n", "mean", "lo", "hi", "p",
                                                                                  "excludes_zero")}})
    return pd.DataFrame(rows, columns=["a", "b", "metric", "n", "mean", "lo", "hi", "p", "excludes_zero"])


def format_interval(row: Mapping, digits: int = 3) -> str:
    """``mean [lo, hi]`` (or just the mean for one seed, "—" for none)."""
    if row.get("mean") is None:
        return "—"
    if row.get("lo") is None:
        return f"{row['mean']:.{digits}f}"
    return f"{row['mean']:.{digits}f} [{row['lo']:.{digits}f}, {row['hi']:.{digits}f}]"
