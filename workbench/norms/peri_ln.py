"""Norms on sublayer outputs: Peri-LN (sandwich: before and after each sublayer) and OLMo-2's reordered
norm (after each sublayer only). The post-sublayer norms are ``blocks.{l}.ln1_post`` / ``ln2_post``.

    peri-ln    x ← x + LN(attn(LN(x))),  x ← x + LN(mlp(LN(x))), final LN      (Kim et al. 2025, Peri-LN)
    peri-rms   the same with RMSNorm at every site                          (Gemma 2/3; not in the default
                                                                             zoo: the norm of those checkpoints)
    post-sub   x ← x + RMS(attn(x)),     x ← x + RMS(mlp(x)),    final RMS     (OLMo 2, 2025)

What a post-sublayer norm means for the analyses: the residual stream is still a sum of what each sublayer
adds, but a sublayer's parts (heads, neurons) reach it only through that norm's live scale — so
decompositions that sum heads into the residual are refused (``residual_is_sum`` is False), as are
removal, folding and export, until they handle these sites.
"""

from __future__ import annotations

from .base import IdentityStandardize, Norm
from .layernorm import layer_norm
from .registry import NormScheme, register
from .rmsnorm import rms_norm


def _post_only(ctx, layer, site):
    return Norm(IdentityStandardize(), None) if site in ("ln1", "ln2") else rms_norm(ctx.d_model, ctx.eps)


PERI_LN = register(
    NormScheme(
        name="peri-ln",
        description="Peri-LN (sandwich): LayerNorm before and after each sub-layer, plus a final LayerNorm",
        reference="Kim et al. 2025, Peri-LN; Gemma Team 2024 (Gemma 2, with RMSNorm)",
        make=lambda ctx, layer, site: layer_norm(ctx),
        placement=lambda ctx, layer: "peri",
    )
)

POST_SUB = register(
    NormScheme(
        name="post-sub",
        description="OLMo 2's reordered norm: RMSNorm on each sub-layer's output before the residual add, none on its input",
        reference="OLMo Team 2025, 2 OLMo 2 Furious",
        make=_post_only,
        placement=lambda ctx, layer: "peri",
        tl_normalization_type="RMS",
        stock="rms-post-sub",  # OLMo 2's
    )
)

PERI_RMS = register(
    NormScheme(
        name="peri-rms",
        description="Sandwich with RMSNorm before and after each sub-layer, plus a final RMSNorm (Gemma 2/3 checkpoints)",
        reference="Gemma Team 2024, Gemma 2; Kim et al. 2025, Peri-LN",
        make=lambda ctx, layer, site: rms_norm(ctx.d_model, ctx.eps),
        placement=lambda ctx, layer: "peri",
        tl_normalization_type="RMS",
        stock="rms-sandwich",  # Gemma 2/3's
        in_default_zoo=False,
    )
)
