"""LayerNorm Scaling (Curse of Depth): Pre-LN whose block-ℓ norm outputs are multiplied by 1/√ℓ.

ℓ is the 1-based layer index; the final norm is not scaled. The scaling damps the growth of the
residual-stream variance with depth that makes deep Pre-LN blocks near-identity.
"""

from __future__ import annotations

import math

from .layernorm import layer_norm
from .registry import NormScheme, register


def _make(ctx, layer, site):
    depth_scale = 1.0 if layer is None else 1.0 / math.sqrt(layer + 1)
    return layer_norm(ctx, depth_scale=depth_scale)


LNS = register(
    NormScheme(
        name="lns",
        description="LayerNorm Scaling: Pre-LN with block l's norm outputs x 1/sqrt(l); final norm unscaled",
        reference="Sun et al. 2025, The Curse of Depth in LLMs",
        make=_make,
    )
)
