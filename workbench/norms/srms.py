"""SimpleRMSNorm (TransNormerLLM): x / ‖x‖₂ · √d — no parameters at all."""

from __future__ import annotations

from .base import Norm
from .rmsnorm import RMSStandardize
from .registry import NormScheme, register

SRMS = register(
    NormScheme(
        name="srms",
        description="SimpleRMSNorm (TransNormerLLM): x/||x|| * sqrt(d), no learned parameters",
        reference="Qin et al. 2023, TransNormerLLM",
        make=lambda ctx, layer, site: Norm(RMSStandardize(ctx.eps), None),
        tl_normalization_type="RMSPre",
    )
)
