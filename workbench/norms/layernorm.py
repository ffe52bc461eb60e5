"""Pre-LN (GPT-2): LN(x) = (x − mean(x)) / sqrt(var(x) + eps) · γ + β before each sub-layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Affine, Norm, Standardize
from .registry import NormScheme, register


class LayerStandardize(Standardize):
    """Center over d_model, divide by the per-token standard deviation."""

    centers = True

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.live_rms_eps = float(eps)

    def forward(self, x, hook_scale):
        x = x - x.mean(-1, keepdim=True)
        scale = hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return x / scale

    fusable = True

    def scale(self, x):
        return (x.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()

    def fused_with_scale(self, x, affine):
        # The fused kernel computes the statistics anyway: take the scale from it (1 / rstd).
        w, b = (affine.w, affine.b) if isinstance(affine, Affine) else (None, None)
        y, _, rstd = torch.native_layer_norm(x, x.shape[-1:], w, b, self.eps)
        return y, rstd.reciprocal()

    def frozen(self, x):
        s = (x.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return (lambda c: (c - c.mean(-1, keepdim=True)) / s), torch.zeros_like(x)

    def fused(self, x, affine):
        w, b = (affine.w, affine.b) if isinstance(affine, Affine) else (None, None)
        return F.layer_norm(x, x.shape[-1:], w, b, self.eps)


def layer_norm(ctx, layer=None, site="ln1", depth_scale: float = 1.0) -> Norm:
    # affine=False: the gain and bias were folded into the following weights (`workbench convert`).
    affine = Affine(ctx.d_model) if ctx.kwargs.get("affine", True) else None
    return Norm(LayerStandardize(ctx.eps), affine, depth_scale)


PRE_LN = register(
    NormScheme(
        name="pre-ln",
        description="Pre-LN (GPT-2): LayerNorm before attention and MLP, plus a final LayerNorm",
        reference="Radford et al. 2019; Xiong et al. 2020",
        make=layer_norm,
        accepts=("affine",),
        stock="layernorm",
    )
)
