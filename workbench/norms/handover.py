"""Hand-overs: how a newly frozen norm moves from its live per-token scale s to its frozen σ.

Each is one registered class with one method, ``scale(live, frozen, progress)``: the divisor at
hand-over progress a ∈ [0, 1] (a rises by 1/steps per fine-tuning step and reaches 1 after ``steps``):

    none   σ                                             (at once; the GPT-2 paper's method)
    ramp   s^(1−a) · σ^a                                 (geometric blend)
    clip   max(σ, (1−a) · s)                             (only positions above σ still normalized)
    taper  1 / (g/s + (1 − g)/σ),  g = ½(1 + cos πa)     (the outputs blended, TaperNorm-style)

The live scale is s = sqrt(mean((x − center)²) + ε) of a LayerNorm or RMSNorm; a norm says whether it
has one (``Standardize.live_rms_eps``). Adding a hand-over is one class here and its test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import WorkbenchError

Scale = Float[Tensor, "batch pos 1"]


@dataclass
class HandOver:
    """A hand-over over ``steps`` fine-tuning steps; ``scale`` is its whole maths."""

    steps: int = 0
    name: ClassVar[str] = ""
    needs_live: ClassVar[bool] = True  # False: the live scale is never computed

    def __post_init__(self) -> None:
        if self.needs_live and self.steps < 1:
            raise WorkbenchError(f"--bridge {self.name} needs --bridge-steps N ≥ 1 (the steps over which it is "
                                 "annealed away)")
        if not self.needs_live and self.steps:
            raise WorkbenchError(f"--bridge-steps needs a hand-over ({', '.join(n for n in HANDOVERS if n != 'none')})")

    def scale(self, live: Scale, frozen: Scale, progress: float) -> Scale:
        raise NotImplementedError

    def progress(self, steps_since_frozen: int) -> float:
        """a after the given number of completed steps since the norm was frozen (1/steps in the first)."""
        return 1.0 if not self.needs_live else min(1.0, (steps_since_frozen + 1) / self.steps)

    def observe(self, live: Scale, frozen: Scale, progress: float) -> dict[str, Tensor]:
        """What this hand-over reports per forward (the metrics file); nothing by default."""
        return {}


HANDOVERS: dict[str, type[HandOver]] = {}


def register(cls: type[HandOver]) -> type[HandOver]:
    if cls.name in HANDOVERS:
        raise ValueError(f"hand-over {cls.name!r} is registered twice")
    HANDOVERS[cls.name] = cls
    return cls


def handover(name: str, steps: int = 0) -> HandOver:
    if name not in HANDOVERS:
        raise WorkbenchError(f"--bridge must be one of {', '.join(HANDOVERS)}, got {name!r}")
    return HANDOVERS[name](steps)


@register
class AtOnce(HandOver):
    """at once, the GPT-2 paper's method."""

    name = "none"
    needs_live = False

    def scale(self, live, frozen, progress):
        return frozen


@register
class Ramp(HandOver):
    """geometric blend s^(1−a)·σ^a."""

    name = "ramp"

    def scale(self, live, frozen, progress):
        return live.pow(1 - progress) * frozen.pow(progress)


@register
class Clip(HandOver):
    """only positions above σ stay normalized, annealed away."""

    name = "clip"

    def scale(self, live, frozen, progress):
        return torch.maximum(frozen, (1 - progress) * live)

    def observe(self, live, frozen, progress):
        # share of positions still normalized by their own scale
        return {"clipped": ((1 - progress) * live > frozen).float().mean()}


@register
class Taper(HandOver):
    """the outputs blended, cosine to 0 (TaperNorm-style)."""

    name = "taper"

    def scale(self, live, frozen, progress):
        g = 0.5 * (1 + math.cos(math.pi * progress))
        return 1 / (g / live + (1 - g) / frozen)


__all__ = ["HANDOVERS", "HandOver", "handover", "register"]
