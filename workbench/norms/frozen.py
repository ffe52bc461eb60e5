"""The "fake" norm of LayerNorm removal: the live per-token scale replaced by one frozen scalar.

    FakeLN(x) = (x − mean(x)) / σ      (centering kept for LayerNorm; RMS-type norms do not center)

σ is calibrated from the live norm (the root mean square of its per-token scale over ordinary
positions) and may follow an exponential moving average while fine-tuning. A *bridge* may hand over
from the live scale s(x) = sqrt(mean x² + ε) to σ gradually, with progress a rising from 0 to 1:

    ramp   scale = s^(1−a) · σ^a                          (geometric blend)
    clip   scale = max(σ, (1−a) · s)                      (only positions above σ are still normalized)
    taper  y = g · x/s + (1 − g) · x/σ,  g = ½(1 + cos πa) (the outputs blended, TaperNorm-style)

Until ``special`` is switched off, position 0 (BOS) and end-of-text tokens divide by their own frozen
σ: their residual norms are far from the others' (attention sinks), so one scalar for all positions
would be too large a step at once; ``special_blend`` may move their σ to the shared one gradually. Not a registered scheme: it is swapped in for a norm's ``standardize`` part.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from jaxtyping import Bool
from torch import Tensor

from .base import Standardize


class SpecialPositions:
    """Which positions keep their own σ, shared by every fake norm of one model; set per forward."""

    def __init__(self, eot_id: int | None, n_first: int = 1):
        self.eot_id = eot_id
        self.n_first = n_first  # the first n_first positions count as BOS (1 = position 0 only)
        self.bos: Bool[Tensor, "batch pos 1"] | None = None
        self.eot: Bool[Tensor, "batch pos 1"] | None = None

    def update(self, tokens: Tensor) -> None:
        pos0 = torch.zeros_like(tokens, dtype=torch.bool)
        pos0[:, : self.n_first] = True
        eot = (tokens == self.eot_id) & ~pos0 if self.eot_id is not None else torch.zeros_like(pos0)
        self.bos, self.eot = pos0.unsqueeze(-1), eot.unsqueeze(-1)

    def ordinary(self) -> Bool[Tensor, "batch pos 1"]:
        return ~(self.bos | self.eot)


class FrozenStandardize(Standardize):
    def __init__(self, sigma: float, centers: bool, positions: SpecialPositions | None = None,
                 sigma_bos: float | None = None, sigma_eot: float | None = None, ema: float = 0.0):
        super().__init__()
        self.centers = centers
        self.positions = positions
        self.ema = float(ema)
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.register_buffer("sigma_bos", torch.tensor(float(sigma_bos if sigma_bos is not None else sigma)))
        self.register_buffer("sigma_eot", torch.tensor(float(sigma_eot if sigma_eot is not None else sigma)))
        self.special = positions is not None and (sigma_bos is not None or sigma_eot is not None)
        # Gradual hand-over (``remove-ln --ramp`` / ``--bridge``): ``blend`` is the progress a, rising to 1.
        self.bridge = "ramp"
        self.blend = 1.0
        self.live_eps: float | None = None
        self.frozen_at = 0  # the fine-tuning step at which the hand-over began
        self.clipped: Tensor | None = None  # clip bridge: share of positions still normalized, last forward
        # Gradual special-off (``--special-steps``): the special positions' σ moves geometrically to σ,
        # σ_special^(1−b) · σ^b with b rising to 1; then ``special`` is switched off.
        self.special_blend = 0.0

    def _center(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.centers else x

    def _scale(self, x: Tensor) -> Tensor:
        if not self.special:
            return self.sigma.reshape(1, 1, 1)
        p = self.positions
        bos, eot = self.sigma_bos, self.sigma_eot
        if self.special_blend > 0:
            b = self.special_blend
            bos, eot = bos.pow(1 - b) * self.sigma.pow(b), eot.pow(1 - b) * self.sigma.pow(b)
        return torch.where(p.bos, bos, torch.where(p.eot, eot, self.sigma))

    @torch.no_grad()
    def _follow(self, xc: Tensor) -> None:
        """EMA of σ towards the live scale of this batch's ordinary positions (all ranks agree)."""
        sq = xc.pow(2).mean(-1, keepdim=True)
        if self.special:
            keep = self.positions.ordinary()
            stats = torch.stack([(sq * keep).sum(), keep.sum().to(sq.dtype)])
        else:
            stats = torch.stack([sq.sum(), torch.tensor(float(sq.numel()), device=sq.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        if stats[1] > 0:
            live = (stats[0] / stats[1]).sqrt()
            self.sigma.mul_(1 - self.ema).add_(self.ema * live)

    def _blended(self, xc: Tensor, frozen: Tensor) -> Tensor:
        if self.blend >= 1.0:
            self.clipped = None
            return frozen
        a = self.blend
        live = (xc.pow(2).mean(-1, keepdim=True) + self.live_eps).sqrt()
        if self.bridge == "clip":
            capped = (1 - a) * live
            with torch.no_grad():
                self.clipped = (capped > frozen).float().mean()
            return torch.maximum(frozen, capped)
        if self.bridge == "taper":
            g = 0.5 * (1 + math.cos(math.pi * a))
            return 1 / (g / live + (1 - g) / frozen)
        return live.pow(1 - a) * frozen.pow(a)

    def forward(self, x, hook_scale):
        xc = self._center(x)
        if self.training and self.ema > 0:
            self._follow(xc.detach().float())
        return xc / hook_scale(self._blended(xc, self._scale(x)))

    def frozen(self, x):
        s = self._scale(x)
        return (lambda c: self._center(c) / s), torch.zeros_like(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma.item():.4g}, centers={self.centers}, special={self.special}, ema={self.ema}"
