"""PowerNorm (Shen et al. 2020): batch normalization made stable for Transformers.

No mean-centering; divide by a running quadratic mean ψ instead of the batch statistic:

    forward   x̂ = x / sqrt(ψ_{t−1} + eps),      ψ_t = α_f ψ_{t−1} + (1 − α_f) mean_B(x²)
    backward  ∂L/∂x = (g − ν_{t−1} x̂) / sqrt(ψ_{t−1} + eps),   g = ∂L/∂x̂
              ν_t = ν_{t−1} (1 − (1 − α_b) mean_B(x̂²)) + (1 − α_b) mean_B(g x̂)

ν is a running estimate of the gradient correction that exact BN would compute from the batch.
For the first ``warmup`` steps the forward divides by the batch statistic mean_B(x²) itself (ψ is
still updated, as a cumulative average, so it is well initialised when the running phase starts).
Statistics are per feature over batch × position. The reference code's group scaling (a per-token
RMS over channel groups before PowerNorm) is not part of the paper's algorithm and is omitted.
"""

from __future__ import annotations

import torch

from ..errors import WorkbenchError
from .base import Affine, Norm, Standardize
from .registry import NormScheme, register

DEFAULTS = {"alpha_fwd": 0.9, "alpha_bkw": 0.9, "warmup": 50}


class _PowerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, nu, alpha_bkw):
        x_hat = x / scale
        ctx.save_for_backward(x_hat, scale)
        ctx.nu, ctx.alpha_bkw = nu, alpha_bkw
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, scale = ctx.saved_tensors
        nu, a = ctx.nu, ctx.alpha_bkw
        dims = tuple(range(g.dim() - 1))
        grad_x = (g - nu * x_hat) / scale
        with torch.no_grad():
            gamma = x_hat.pow(2).mean(dims)
            lam = (g * x_hat).mean(dims)
            nu.mul_(1 - (1 - a) * gamma).add_((1 - a) * lam)
        return grad_x, None, None, None


class PowerStandardize(Standardize):
    def __init__(self, d_model: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 warmup: int = 50):
        super().__init__()
        self.eps, self.alpha_fwd, self.alpha_bkw, self.warmup = eps, alpha_fwd, alpha_bkw, int(warmup)
        self.register_buffer("running_phi", torch.ones(d_model))  # ψ
        self.register_buffer("nu", torch.zeros(d_model))  # ν
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def frozen(self, x):
        if self.training:
            raise ValueError("this norm is linear only in eval mode (running statistics); call model.eval()")
        s = (self.running_phi + self.eps).sqrt()
        return (lambda c: c / s), torch.zeros_like(x)

    def forward(self, x, hook_scale):
        if not self.training:
            scale = hook_scale((self.running_phi + self.eps).sqrt().reshape(1, 1, -1))
            return x / scale
        self.step += 1
        t = int(self.step)
        with torch.no_grad():
            phi_batch = x.detach().reshape(-1, x.shape[-1]).pow(2).mean(0)
            stat = phi_batch if t <= self.warmup else self.running_phi.clone()
            if t < self.warmup:
                self.running_phi.mul_((t - 1) / t).add_(phi_batch / t)
            self.running_phi.lerp_(phi_batch, 1 - self.alpha_fwd)
        scale = hook_scale((stat + self.eps).sqrt().reshape(1, 1, -1))
        return _PowerNormFn.apply(x, scale, self.nu, self.alpha_bkw)


def _validate(ctx) -> None:
    for k in ("alpha_fwd", "alpha_bkw"):
        if not 0.0 <= ctx.kwargs.get(k, DEFAULTS[k]) < 1.0:
            raise WorkbenchError(f"powernorm {k} must lie in [0, 1)")


POWERNORM = register(
    NormScheme(
        name="powernorm",
        description="PowerNorm: running quadratic mean, no centering, approximate backward (alpha=0.9)",
        reference="Shen et al. 2020, PowerNorm: Rethinking Batch Normalization in Transformers",
        make=lambda ctx, layer, site: Norm(
            PowerStandardize(ctx.d_model, ctx.eps, **{**DEFAULTS, **ctx.kwargs}), Affine(ctx.d_model)
        ),
        tl_normalization_type="PN",
        scale_is_per_token=False,
        validate=_validate,
        accepts=tuple(DEFAULTS),
    )
)
