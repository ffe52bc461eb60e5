"""QK-norm: an RMSNorm (with gain) over each head's query and key, after their projection and before
the rotary embedding — so the attention logit q·k/√d_head is bounded by the gains, whatever the residual
stream's scale (Henry et al. 2020; Dehghani et al. 2023; Qwen3, Gemma 3, OLMo-2 over the whole projection).

The zoo member ``qk-norm`` is Pre-RMSNorm blocks plus per-head QK-norm; any other model gets it through
``ModelConfig.qk_norm = "head"`` (the Qwen3 family), or over the whole projection through ``"proj"`` (OLMo-2:
one RMS over all n_heads·d_head query values of a token, another over its n_kv_heads·d_head key values).
Each q/k norm is a workbench ``Norm`` at ``blocks.{l}.attn.q_norm`` / ``k_norm`` with ``hook_scale``
[batch, pos, head, 1] ("head") or [batch, pos, 1] ("proj", reading the query or key as [batch, pos,
head·d_head]).
"""

from __future__ import annotations

from .base import Norm
from .registry import NormScheme, register
from .rmsnorm import rms_norm


def head_norm(d_head: int, eps: float) -> Norm:
    """The RMSNorm over the last (d_head) axis of a [batch, pos, head, d_head] query or key."""
    return rms_norm(d_head, eps)


def proj_norm(n_heads: int, d_head: int, eps: float) -> Norm:
    """The RMSNorm over a whole [batch, pos, n_heads·d_head] query or key projection (one scale per token)."""
    return rms_norm(n_heads * d_head, eps)


QK_NORM = register(
    NormScheme(
        name="qk-norm",
        description="Pre-RMSNorm plus per-head QK-norm: an RMSNorm on each head's query and key (Qwen3, Gemma 3)",
        reference="Henry et al. 2020, Query-Key Normalization; Dehghani et al. 2023; Qwen3 2025",
        make=lambda ctx, layer, site: rms_norm(ctx.d_model, ctx.eps),
        tl_normalization_type="RMS",
        qk_norm="head",
    )
)
