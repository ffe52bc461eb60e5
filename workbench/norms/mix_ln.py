"""Mix-LN: Post-LN in the first ⌊αL⌋ blocks, Pre-LN in the rest, so gradient norms stay uniform with depth."""

from __future__ import annotations

import math

from ..errors import WorkbenchError
from .layernorm import layer_norm
from .registry import NormScheme, register

DEFAULT_ALPHA = 0.25


def n_post_blocks(cfg) -> int:
    return math.floor(cfg.norm_kwargs.get("alpha", DEFAULT_ALPHA) * cfg.n_layers)


def _validate(cfg) -> None:
    alpha = cfg.norm_kwargs.get("alpha", DEFAULT_ALPHA)
    if not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"mix-ln alpha must lie in [0, 1], got {alpha}")


MIX_LN = register(
    NormScheme(
        name="mix-ln",
        description="Mix-LN: Post-LN in the first floor(alpha*L) blocks (alpha=0.25), Pre-LN after",
        reference="Li et al. 2024, Mix-LN",
        make=lambda cfg, layer, site: layer_norm(cfg),
        placement=lambda cfg, layer: "post" if layer < n_post_blocks(cfg) else "pre",
        validate=_validate,
        accepts=("alpha",),
    )
)
