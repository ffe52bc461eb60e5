"""No normalization, trained from scratch. The norm sites keep their hook points (scale ≡ 1)."""

from __future__ import annotations

from .base import IdentityStandardize, Norm
from .registry import NormScheme, register

NONE = register(
    NormScheme(
        name="none",
        description="No normalization at all (identity at every norm site), trained from scratch",
        reference="baseline",
        make=lambda ctx, layer, site: Norm(IdentityStandardize(), None),
        tl_normalization_type=None,
        stock="identity",
        pre_norm_free=lambda ctx: True,
    )
)
