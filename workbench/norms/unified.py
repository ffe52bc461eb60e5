"""Unified Normalization (Yang et al. 2022): offline-foldable batch statistics for Transformers.

Per feature, s_t = mean_B(x²) (no centering). A window of the last M batch statistics smooths the
forward: σ²_t = geometric mean of the window (the current batch included); the backward compensates
the gradient with a windowed estimate of the BN correction term instead of the exact batch one:

    forward   x̂ = x / sqrt(σ²_t + eps)
    backward  c_t = mean_B(g x̂);  μ_t = mean of the last M c's;  ν ← m ν + (1 − m) μ_t
              ∂L/∂x = (g − ν x̂) / sqrt(σ²_t + eps)

Before M steps have been seen (or during ``warmup``) the current batch statistic and correction are
used alone. Adaptive outlier filtration (off by default, as the authors recommend for language): a
step whose window arithmetic mean exceeds its geometric mean by more than M·Var(√window) is treated
as an outlier, and its statistic is replaced by the running variance. At evaluation the running
variance (momentum m) is the divisor, so the norm folds into the next linear layer.
"""

from __future__ import annotations

import torch

from ..errors import WorkbenchError
from .base import Affine, Norm, Standardize
from .registry import NormScheme, register

DEFAULTS = {"window": 4, "warmup": 50, "momentum": 0.9, "outlier_filtration": False}


class _UnifiedNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, owner, use_window, slot):
        x_hat = x / scale
        ctx.save_for_backward(x_hat, scale)
        ctx.owner, ctx.use_window, ctx.slot = owner, use_window, slot
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, scale = ctx.saved_tensors
        un: UnifiedStandardize = ctx.owner
        with torch.no_grad():
            c = (g * x_hat).mean(tuple(range(g.dim() - 1)))
            un.grad_window[ctx.slot] = c
            mu = un.grad_window.mean(0) if ctx.use_window else c
            un.nu.lerp_(mu, 1 - un.momentum)
        return (g - un.nu * x_hat) / scale, None, None, None, None


class UnifiedStandardize(Standardize):
    def __init__(self, d_model: int, eps: float = 1e-5, window: int = 4, warmup: int = 50,
                 momentum: float = 0.9, outlier_filtration: bool = False):
        super().__init__()
        self.eps, self.window, self.warmup = eps, int(window), int(warmup)
        self.momentum, self.outlier_filtration = momentum, bool(outlier_filtration)
        self.register_buffer("stat_window", torch.ones(self.window, d_model))
        self.register_buffer("grad_window", torch.zeros(self.window, d_model))
        self.register_buffer("running_var", torch.ones(d_model))
        self.register_buffer("nu", torch.zeros(d_model))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def frozen(self, x):
        if self.training:
            raise ValueError("this norm is linear only in eval mode (running statistics); call model.eval()")
        s = (self.running_var + self.eps).sqrt()
        return (lambda c: c / s), torch.zeros_like(x)

    def forward(self, x, hook_scale):
        if not self.training:
            scale = hook_scale((self.running_var + self.eps).sqrt().reshape(1, 1, -1))
            return x / scale
        self.step += 1
        t = int(self.step)
        with torch.no_grad():
            s = x.detach().reshape(-1, x.shape[-1]).pow(2).mean(0)
            spread = self.stat_window.sqrt().var()
            self.stat_window[(t - 1) % self.window] = s
            use_window = t > self.window and t > self.warmup
            if use_window and self.outlier_filtration:
                am = self.stat_window.mean(0)
                gm = self.stat_window.clamp_min(1e-30).log().mean(0).exp()
                if bool(((am - gm) > self.window * spread).any()):
                    self.stat_window[(t - 1) % self.window] = self.running_var
                    s, use_window = self.running_var.clone(), False
            var = self.stat_window.clamp_min(1e-30).log().mean(0).exp() if use_window else s
            self.running_var.lerp_(var, 1 - self.momentum)
        scale = hook_scale((var + self.eps).sqrt().reshape(1, 1, -1))
        return _UnifiedNormFn.apply(x, scale, self, use_window, (t - 1) % self.window)


def _validate(ctx) -> None:
    if int(ctx.kwargs.get("window", DEFAULTS["window"])) < 1:
        raise WorkbenchError("unified window must be >= 1")


UNIFIED = register(
    NormScheme(
        name="unified",
        description="Unified Normalization: windowed (geometric-mean) statistics with gradient compensation",
        reference="Yang et al. 2022, Unified Normalization for Accelerating and Stabilizing Transformers",
        make=lambda ctx, layer, site: Norm(
            UnifiedStandardize(ctx.d_model, ctx.eps, **{**DEFAULTS, **ctx.kwargs}), Affine(ctx.d_model)
        ),
        tl_normalization_type="UN",
        scale_is_per_token=False,
        validate=_validate,
        accepts=tuple(DEFAULTS),
    )
)
