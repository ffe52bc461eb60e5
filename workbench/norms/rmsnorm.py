"""Pre-RMSNorm: RMS(x) = x / sqrt(mean(x²) + eps) · γ; no centering, no bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Affine, Norm, Standardize
from .registry import NormScheme, register


class RMSStandardize(Standardize):
    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.live_rms_eps = float(eps)

    def forward(self, x, hook_scale):
        scale = hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return x / scale

    fusable = True

    def scale(self, x):
        return (torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / x.shape[-1] + self.eps).sqrt()

    def frozen(self, x):
        s = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return (lambda c: c / s), torch.zeros_like(x)

    def fused(self, x, affine):
        w = affine.w if isinstance(affine, Affine) else None
        if w is not None and w.dtype != x.dtype:  # a bf16 projection (QK-norm under autocast): the fused kernel
            w = w.to(x.dtype)                      # needs one dtype, else torch falls back with a warning
        y = F.rms_norm(x, x.shape[-1:], w, self.eps)
        return y if not isinstance(affine, Affine) or affine.b is None else y + affine.b


def rms_norm(d: int, eps: float) -> Norm:
    """RMSNorm with a gain over the last axis of size ``d``: every RMSNorm site of every scheme."""
    return Norm(RMSStandardize(eps), Affine(d, bias=False))


PRE_RMS = register(
    NormScheme(
        name="pre-rms",
        description="Pre-RMSNorm: RMSNorm (gain, no bias, no centering) before each sub-layer",
        reference="Zhang & Sennrich 2019; Jiang et al. 2023",
        make=lambda ctx, layer, site: rms_norm(ctx.d_model, ctx.eps),
        tl_normalization_type="RMS",
        stock="rmsnorm",
    )
)
