"""Pre-CRMSNorm (Jiang et al. 2023): RMSNorm of a compressed zero-mean vector.

A zero-mean vector z ∈ R^{D} is stored as its first D−1 coordinates x; the dropped one is −Σx.
So RMS(z) = sqrt((Σ x_i² + (Σ x_i)²) / D) with D = d_model + 1, and CRMSNorm(x) = x / RMS(z).
Pre-LN with width D converts exactly into Pre-CRMSNorm with width D − 1.
"""

from __future__ import annotations

import torch

from .base import Affine, Norm, Standardize
from .registry import NormScheme, register


class CRMSStandardize(Standardize):
    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x, hook_scale):
        d_full = x.shape[-1] + 1
        sq = x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)
        scale = hook_scale((sq / d_full + self.eps).sqrt())
        return x / scale

    def frozen(self, x):
        d_full = x.shape[-1] + 1
        s = ((x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / d_full + self.eps).sqrt()
        return (lambda c: c / s), torch.zeros_like(x)


PRE_CRMS = register(
    NormScheme(
        name="pre-crms",
        description="Pre-CRMSNorm: compressed RMSNorm (implicit zero-mean coordinate) before each sub-layer",
        reference="Jiang et al. 2023, Pre-RMSNorm and Pre-CRMSNorm Transformers",
        make=lambda ctx, layer, site: Norm(CRMSStandardize(ctx.eps), Affine(ctx.d_model)),
        tl_normalization_type="RMS",
    )
)
