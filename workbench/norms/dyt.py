"""Dynamic Tanh (Zhu et al. 2025): DyT(x) = γ · tanh(αx) + β, an elementwise stand-in for a norm.

α is a learned scalar. Written as tanh(x / s) with s = 1/α, so ``hook_scale`` carries s: the scale
DyT divides by before squashing, comparable to a LayerNorm's σ for inputs in tanh's linear range.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Affine, Norm, Standardize
from .registry import NormScheme, register

DEFAULT_ALPHA0 = 0.5


class TanhStandardize(Standardize):
    def __init__(self, alpha0: float = DEFAULT_ALPHA0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha0)))

    def forward(self, x, hook_scale):
        scale = hook_scale((1.0 / self.alpha).reshape(1, 1, 1))
        return torch.tanh(x / scale)

    def frozen(self, x):
        # The elementwise gain tanh(αx)/x at the operating point (its limit α where x = 0).
        a = self.alpha
        gain = torch.where(x == 0, a.expand_as(x), torch.tanh(a * x) / torch.where(x == 0, torch.ones_like(x), x))
        return (lambda c: c * gain), torch.zeros_like(x)


DYT = register(
    NormScheme(
        name="dyt",
        description="Dynamic Tanh: gamma*tanh(alpha*x)+beta in place of every norm (alpha0=0.5)",
        reference="Zhu et al. 2025, Transformers without Normalization",
        make=lambda ctx, layer, site: Norm(
            TanhStandardize(ctx.kwargs.get("alpha0", DEFAULT_ALPHA0)), Affine(ctx.d_model)
        ),
        tl_normalization_type="DyT",
        scale_is_per_token=False,
        accepts=("alpha0",),
    )
)
