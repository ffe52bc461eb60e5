"""Norms as parts: a parameter-free standardization followed by a learned affine.

``Norm`` owns the TransformerLens hook points; ``standardize`` computes the statistic and divides,
``affine`` applies the learned gain and bias. Freezing, folding or removing a norm swaps one part.

Shapes: ``batch pos d_model`` for activations. ``hook_scale`` is ``[batch, pos, 1]`` for per-token
norms (LayerNorm, RMSNorm), ``[1, 1, d_model]`` for per-feature batch norms and ``[1, 1, 1]`` for a
single scalar (DyT's 1/alpha, the identity's 1).
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..errors import WorkbenchError

HookFn = Callable[[Tensor], Tensor]


class Standardize(nn.Module):
    """Parameter-free standardization: x ↦ (x − center) / scale. Subclasses define both.

    ``fused(x, affine)`` may compute affine(standardize(x)) in one PyTorch kernel; it is used only
    when no hook observes the scale or the normalized value.
    """

    fusable = False
    # True when the standardization subtracts the per-token mean (LayerNorm); LayerNorm removal keeps
    # the centering of such a norm and freezes only its scale.
    centers = False

    # ε when the live scale is sqrt(mean((x − center)²) + ε), per token (LayerNorm, RMSNorm): what a
    # gradual hand-over to a frozen scale needs to recompute it. None for every other statistic.
    live_rms_eps: float | None = None

    # True once the scale is one calibrated constant (LayerNorm removal's frozen norm), not a statistic.
    scale_frozen = False

    # True when the standardization is the identity (no statistic, nothing to fold).
    is_identity = False

    def fused(self, x: Tensor, affine: nn.Module) -> Tensor:
        raise NotImplementedError

    def fold_scale(self, site: str = "a norm") -> Float[Tensor, ""]:
        """The one scalar this standardization divides by, once it computes no statistic (float64); folding
        asks it. Refuses, naming ``site``, while the scale is still live."""
        raise WorkbenchError(f"{site} still normalizes by a live statistic ({type(self).__name__}), so it is not an "
                             "affine map to fold; freeze its scale first (workbench remove-ln)")

    def ordinary_scale(self) -> Tensor | None:
        """The constant an ordinary token is divided by once the scale is frozen; None while it is a
        statistic (what the logit-scale anchor pulls the final residual towards)."""
        return None

    def scale(self, x: Tensor) -> Tensor:
        """The per-token scale alone (fusable standardizations only)."""
        raise NotImplementedError

    def fused_with_scale(self, x: Tensor, affine: nn.Module) -> tuple[Tensor, Tensor]:
        return self.fused(x, affine), self.scale(x)

    def frozen(self, x: Float[Tensor, "... d_model"]) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """The standardization with its statistics frozen at ``x``: a linear map L and a constant k
        with standardize(x) = L(x) + k. Applied to each component of x, L gives that component's
        share — the "cached scale" of direct logit attribution, generalized to every norm."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen-statistics linearization")

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], hook_scale: HookFn
    ) -> Float[Tensor, "batch pos d_model"]:
        raise NotImplementedError


class Affine(nn.Module):
    """Learned elementwise gain and bias: y = w ⊙ x̂ + b."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return x * self.w if self.b is None else torch.addcmul(self.b, x, self.w)


class Norm(nn.Module):
    """norm(x) = affine(standardize(x)) · depth_scale."""

    def __init__(self, standardize: Standardize, affine: nn.Module | None, depth_scale: float = 1.0):
        super().__init__()
        self.standardize = standardize
        self.affine = affine if affine is not None else nn.Identity()
        # LayerNorm Scaling multiplies each pre-norm output by 1/sqrt(layer); 1.0 everywhere else.
        self.depth_scale = float(depth_scale)
        self.hook_scale = HookPoint()  # [batch, pos, 1] | [1, 1, d_model] | [1, 1, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.hook_normalized.has_hooks() or not self.standardize.fusable:
            y = self.affine(self.hook_normalized(self.standardize(x, self.hook_scale)))
        elif self.hook_scale.has_hooks():
            # Observing the scale is cheap (one reduction); only a hook that *changes* it needs the
            # written-out division, by the scale the hook returned.
            y, scale = self.standardize.fused_with_scale(x, self.affine)
            hooked = self.hook_scale(scale)
            if hooked is not scale:
                y = self.affine(self.standardize(x, lambda s: hooked))
        else:
            # Nobody observes the intermediate values: PyTorch's fused kernel computes the same norm.
            y = self.standardize.fused(x, self.affine)
        return y if self.depth_scale == 1.0 else y * self.depth_scale

    def extra_repr(self) -> str:
        return "" if self.depth_scale == 1.0 else f"depth_scale={self.depth_scale:.4g}"


class IdentityStandardize(Standardize):
    """No standardization: scale 1. Keeps the hook points of a norm on norm-free models."""

    def forward(self, x, hook_scale):
        hook_scale(x.new_ones(1, 1, 1))
        return x

    def frozen(self, x):
        return (lambda c: c), torch.zeros_like(x)

    is_identity = True

    def fold_scale(self, site: str = "a norm"):
        return torch.tensor(1.0, dtype=torch.float64)
