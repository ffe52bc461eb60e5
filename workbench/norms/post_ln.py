"""Post-LN (original Transformer): x ← LN(x + sublayer(x)); no final norm, the last block ends normalized."""

from __future__ import annotations

from .base import IdentityStandardize, Norm
from .layernorm import layer_norm
from .registry import NormScheme, register


def _make(ctx, layer, site):
    if site == "ln_final":
        return Norm(IdentityStandardize(), None)
    return layer_norm(ctx)


POST_LN = register(
    NormScheme(
        name="post-ln",
        description="Post-LN (original Transformer): LayerNorm after each residual addition",
        reference="Vaswani et al. 2017",
        make=_make,
        placement=lambda ctx, layer: "post",
    )
)
