"""Mix-LN: Post-LN in the first ⌊αL⌋ blocks, Pre-LN in the rest, so gradient norms stay uniform with depth."""

from __future__ import annotations

import math

from ..errors import WorkbenchError
from .base import IdentityStandardize, Norm
from .layernorm import layer_norm
from .registry import NormScheme, register

DEFAULT_ALPHA = 0.25


def n_post_blocks(ctx) -> int:
    return math.floor(ctx.kwargs.get("alpha", DEFAULT_ALPHA) * ctx.n_layers)


def _validate(ctx) -> None:
    alpha = ctx.kwargs.get("alpha", DEFAULT_ALPHA)
    if not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"mix-ln alpha must lie in [0, 1], got {alpha}")


def _make(ctx, layer, site):
    # After LayerNorm removal (``pre_ln_free``) the Pre-LN blocks and the final norm are identities;
    # the Post-LN blocks keep their live LayerNorm, which normalizes the residual stream itself.
    if ctx.kwargs.get("pre_ln_free") and (layer is None or layer >= n_post_blocks(ctx)):
        return Norm(IdentityStandardize(), None)
    return layer_norm(ctx)


MIX_LN = register(
    NormScheme(
        name="mix-ln",
        description="Mix-LN: Post-LN in the first floor(alpha*L) blocks (alpha=0.25), Pre-LN after",
        reference="Li et al. 2024, Mix-LN",
        make=_make,
        placement=lambda ctx, layer: "post" if layer < n_post_blocks(ctx) else "pre",
        validate=_validate,
        accepts=("alpha", "pre_ln_free"),
        pre_norm_free=lambda ctx: bool(ctx.kwargs.get("pre_ln_free")),
    )
)
