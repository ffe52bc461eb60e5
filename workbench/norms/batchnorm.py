"""Naive BatchNorm over batch × position: the failure baseline.

Per-feature mean and variance over every token of the batch. In training, a token's output depends
on the other tokens of the batch — including later positions — so the causal LM objective leaks;
at evaluation the running statistics are used instead.
"""

from __future__ import annotations

import torch

from .base import Affine, Norm, Standardize
from .registry import NormScheme, register


class BatchStandardize(Standardize):
    def __init__(self, d_model: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.register_buffer("running_var", torch.ones(d_model))

    def forward(self, x, hook_scale):
        if self.training:
            flat = x.reshape(-1, x.shape[-1])
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
            with torch.no_grad():
                n = flat.shape[0]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = hook_scale((var + self.eps).sqrt().reshape(1, 1, -1))
        return (x - mean) / scale

    def frozen(self, x):
        if self.training:
            raise ValueError("batchnorm is linear only in eval mode (running statistics); call model.eval()")
        s = (self.running_var + self.eps).sqrt()
        return (lambda c: c / s), (-self.running_mean / s).expand_as(x)


BATCHNORM = register(
    NormScheme(
        name="batchnorm",
        description="Naive BatchNorm over batch x position (failure baseline: leaks across positions)",
        reference="Ioffe & Szegedy 2015; Shen et al. 2020 on why it fails in Transformers",
        make=lambda ctx, layer, site: Norm(BatchStandardize(ctx.d_model, ctx.eps), Affine(ctx.d_model)),
        tl_normalization_type="BN",
        scale_is_per_token=False,
    )
)
