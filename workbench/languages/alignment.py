"""How aligned two sets of pooled representations are, unit by unit: cosine and retrieval, with intervals,
and the rank statistics the Ranker is validated with.

``x[i]`` is unit i in language X and ``e[i]`` its English original, each ``[layer, d_model]``.

- **cosine**: cos(x_i, e_i) per layer (Li et al. 2024), after subtracting each side's mean over units
  when ``center`` (a language-wide offset is not alignment).
- **retrieval** (MEXA, Kargaran et al. 2025): unit i is aligned at a layer when its similarity to its own
  translation is the strict maximum of its row (x_i against every English unit) *and* of its column
  (e_i against every X unit) of the similarity matrix. The score is the share of aligned units. It
  depends on what the representations *distinguish*, not on their absolute angle, so anisotropy and a
  language-wide offset do not move it. With similarities that carry no information (i.i.d.), a unit is
  the maximum of its 2n − 1 cells with probability 1/(2n − 1): that is chance.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

BOOTSTRAP = 200  # resamples of the units for a 95 % interval


def spearman(x, y) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties share their mean rank); NaN below 3 points."""
    a, b = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return float("nan")
    ra, rb = a[ok].rank(), b[ok].rank()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_interval(x, y, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of Spearman's ρ over the points (languages); None below 4."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) < 4:
        return None
    rng = np.random.default_rng(seed)
    rhos = [spearman(a[i], b[i]) for i in rng.integers(0, len(a), (BOOTSTRAP, len(a)))]
    rhos = [r for r in rhos if not math.isnan(r)]
    return [float(np.quantile(rhos, 0.025)), float(np.quantile(rhos, 0.975))] if rhos else None


def partial_spearman(x, y, z) -> float:
    """Spearman's ρ of x and y controlling for z: the partial correlation of the ranks,
    (r_xy − r_xz·r_yz) / √((1 − r_xz²)(1 − r_yz²)). NaN below 4 complete points."""
    df = pd.DataFrame({"x": x, "y": y, "z": z}, dtype=float).dropna()
    if len(df) < 4:
        return float("nan")
    r = df.rank().corr().to_numpy()
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    den = math.sqrt(max(0.0, (1 - rxz**2) * (1 - ryz**2)))
    return float("nan") if den == 0 else float((rxy - rxz * ryz) / den)


def _centered(x: Tensor, e: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    return (x - x.mean(0), e - e.mean(0)) if center else (x, e)


def cosine(x: Float[Tensor, "unit layer d"], e: Float[Tensor, "unit layer d"], center: bool) -> Float[Tensor, "unit layer"]:
    x, e = _centered(x, e, center)
    return F.cosine_similarity(x, e, dim=-1)


def retrieval_hits(x: Float[Tensor, "unit layer d"], e: Float[Tensor, "unit layer d"],
                   center: bool) -> Bool[Tensor, "unit layer"]:
    """Whether cos(x_i, e_i) strictly beats every cos(x_i, e_j) and every cos(x_j, e_i), j ≠ i."""
    x, e = _centered(x, e, center)
    s = torch.einsum("ild,jld->lij", F.normalize(x, dim=-1), F.normalize(e, dim=-1))  # [layer, X unit, English unit]
    n = s.shape[-1]
    diag = s.diagonal(dim1=1, dim2=2)  # [layer, unit]
    off = s.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return ((diag > off.amax(2)) & (diag > off.amax(1))).T


def mean_interval(values: Float[Tensor, " unit"], seed: int) -> list[float]:
    """95 % percentile-bootstrap interval of the mean of per-unit values."""
    n = values.shape[0]
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, n, (BOOTSTRAP, n), generator=g)].mean(1)
    lo, hi = torch.quantile(means.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(lo), float(hi)]


def cosine_interval(x: Tensor, e: Tensor, center: bool, seed: int) -> list[float]:
    """95 % percentile-bootstrap interval of the mean cosine over units, centering redone per resample
    (the centering mean is itself estimated from the units).

    Computed from the units' Gram matrices: with resample counts w (Σw = n) the centered inner product
    is <x_i − x̄_w, e_i − ē_w> = G_xe[i,i] − (G_xe w)_i/n − (wᵀG_xe)_i/n + wᵀG_xe w/n², and the norms
    likewise, so a resample costs O(n²) per layer instead of O(n·d)."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (BOOTSTRAP, n), generator=g)
    w = torch.zeros(BOOTSTRAP, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(BOOTSTRAP, n, dtype=torch.float64))
    xd, ed = x.double().transpose(0, 1), e.double().transpose(0, 1)  # [layer, unit, d]
    gxe, gxx, gee = xd @ ed.transpose(1, 2), xd @ xd.transpose(1, 2), ed @ ed.transpose(1, 2)  # [layer, n, n]

    def centered(gab: Tensor) -> Tensor:  # [resample, layer, unit]: <a_i − ā_w, b_i − b̄_w>
        diag = gab.diagonal(dim1=1, dim2=2)[None]
        if not center:
            return diag.expand(BOOTSTRAP, -1, -1)
        row = torch.einsum("lij,bj->bli", gab, w) / n  # <a_i, b̄_w>
        col = torch.einsum("lji,bj->bli", gab, w) / n  # <ā_w, b_i>
        both = torch.einsum("bi,lij,bj->bl", w, gab, w)[..., None] / n**2  # <ā_w, b̄_w>
        return diag - row - col + both

    cos = centered(gxe) / (centered(gxx).clamp_min(0).sqrt() * centered(gee).clamp_min(0).sqrt()).clamp_min(1e-12)
    scores = (cos * w[:, None, :]).sum(2).mean(1) / n  # each resample weights unit i by how often it was drawn
    lo, hi = torch.quantile(scores, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(lo), float(hi)]
