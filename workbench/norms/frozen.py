"""The "fake" norm of LayerNorm removal: the live per-token scale replaced by one frozen scalar.

    FakeLN(x) = (x − mean(x)) / σ      (centering kept for LayerNorm; RMS-type norms do not center)

σ is calibrated from the live norm (the root mean square of its per-token scale over ordinary
positions) and may follow an exponential moving average while fine-tuning. A *hand-over*
(``workbench.norms.handover``) may move from the live scale s(x) = sqrt(mean x² + ε) to σ gradually,
with progress a rising from 0 to 1; the norm holds one hand-over object and asks it for the scale.

Until ``special`` is switched off, position 0 (BOS) and end-of-text tokens divide by their own frozen
σ: their residual norms are far from the others' (attention sinks), so one scalar for all positions
would be too large a step at once; ``special_blend`` may move their σ to the shared one gradually. Not a registered scheme: it is swapped in for a norm's ``standardize`` part.

With a sink prefix (``SpecialPositions(sink=True)``, ``remove-ln --sink-prefix``) position 0 keeps its *live*
scale at every frozen norm to the end: it always holds the same token, so what it computes is a constant of
the weights that ``model/sink.py`` stores as a key/value prefix instead of handing it over.

A *guard* (``remove-ln --guard C``, training only) soft-caps each position's output RMS r = s/scale at C:
r where r ≤ C, C·(1 + log(r/C)) above (``soft_cap``). A frozen gated model squares a loud position's scale
at every MLP, so one runaway token overflows its window and the step is skipped — no gradient from the
very windows that matter; under the guard that window stays finite and its loss and penalties count. It
acts whenever the model is in training mode (the fine-tune, and the calibration of the next σ, which a
runaway window would otherwise make non-finite); at evaluation and in the folded model it is off.

A per-head QK-norm (input [batch, pos, head, d_head]) freezes one σ per head: ``sigma`` is then a list,
held as an [head, 1] buffer that broadcasts over each head's d_head values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Bool
from torch import Tensor

from ..errors import WorkbenchError
from .base import Standardize
from .handover import AtOnce, HandOver


Sigma = float | list[float]  # one σ, or one per head


def soft_cap(scale: Tensor, live: Tensor, cap: float) -> Tensor:
    """The divisor under which a position's output RMS r = live/scale becomes r for r ≤ cap and
    cap·(1 + log(r/cap)) above: continuous with slope 1 at cap, then slope cap/r, never 0."""
    r = live / scale
    capped = cap * (1 + torch.log(r.clamp_min(cap) / cap))  # clamped: the unused branch never divides by 0 (at r = cap/e)
    return torch.where(r > cap, live / capped, scale)


def _as_buffer(sigma: Sigma) -> Tensor:
    """A scalar buffer for one σ, an [head, 1] one for a σ per head."""
    if isinstance(sigma, (list, tuple)):
        return torch.tensor([float(v) for v in sigma]).reshape(-1, 1)
    return torch.tensor(float(sigma))


class SpecialPositions:
    """Which positions keep their own σ, shared by every fake norm of one model; set per forward."""

    def __init__(self, eot_id: int | None, n_first: int = 1, sink: bool = False):
        self.eot_id = eot_id
        self.n_first = n_first  # the first n_first positions count as BOS (1 = position 0 only)
        self.sink = sink  # position 0 keeps its live scale to the end
        self.bos: Bool[Tensor, "batch pos 1"] | None = None
        self.eot: Bool[Tensor, "batch pos 1"] | None = None
        self.sink_mask: Bool[Tensor, "batch pos 1"] | None = None

    def update(self, tokens: Tensor) -> None:
        pos0 = torch.zeros_like(tokens, dtype=torch.bool)
        pos0[:, : self.n_first] = True
        eot = (tokens == self.eot_id) & ~pos0 if self.eot_id is not None else torch.zeros_like(pos0)
        self.bos, self.eot = pos0.unsqueeze(-1), eot.unsqueeze(-1)
        if self.sink:
            first = torch.zeros_like(self.bos)
            first[:, 0] = True
            self.sink_mask = first

    def ordinary(self) -> Bool[Tensor, "batch pos 1"]:
        return ~(self.bos | self.eot)


class FrozenStandardize(Standardize):
    scale_frozen = True

    def __init__(self, sigma: Sigma, centers: bool, positions: SpecialPositions | None = None,
                 sigma_bos: Sigma | None = None, sigma_eot: Sigma | None = None, ema: float = 0.0,
                 handover: HandOver | None = None, live_eps: float | None = None, frozen_at: int = 0,
                 guard: float = 0.0):
        super().__init__()
        self.centers = centers
        self.positions = positions
        self.ema = float(ema)
        self.register_buffer("sigma", _as_buffer(sigma))
        self.register_buffer("sigma_bos", _as_buffer(sigma_bos if sigma_bos is not None else sigma))
        self.register_buffer("sigma_eot", _as_buffer(sigma_eot if sigma_eot is not None else sigma))
        self.special = positions is not None and (sigma_bos is not None or sigma_eot is not None)
        self.handover = handover if handover is not None else AtOnce()
        if (self.handover.needs_live or (positions is not None and positions.sink)) and live_eps is None:
            raise WorkbenchError(f"--bridge {self.handover.name} needs a LayerNorm or RMSNorm (a live scale "
                                 "sqrt(mean x² + eps))" if self.handover.needs_live else "--sink-prefix needs a "
                                 "LayerNorm or RMSNorm: position 0 keeps its live scale sqrt(mean x² + eps)")
        if guard and live_eps is None:
            raise WorkbenchError("--guard needs a LayerNorm or RMSNorm (a live scale sqrt(mean x² + eps))")
        self.live_eps = live_eps
        self.guard = float(guard)  # 0: off
        self.frozen_at = frozen_at  # the fine-tuning step at which the hand-over began
        self.progress = 0.0 if self.handover.needs_live else 1.0
        self.observed: dict[str, Tensor] = {}  # what the hand-over reported on the last forward
        # Gradual special-off (``--special-steps``): the special positions' σ moves geometrically to σ,
        # σ_special^(1−b) · σ^b with b rising to 1; then ``special`` is switched off.
        self.special_blend = 0.0

    def hand_over_at(self, step: int, special_off: int | None = None, special_steps: int = 0) -> None:
        """Progress at fine-tuning ``step``: a function of the step alone, so a resume recomputes it."""
        self.progress = self.handover.progress(step - self.frozen_at)
        if special_off is not None and self.special:
            self.special_blend = min(1.0, (step - special_off + 1) / special_steps)
            self.special = self.special_blend < 1.0

    def fold_scale(self, site: str = "a norm") -> Tensor:
        if self.special:
            raise WorkbenchError(f"{site} still keeps its own BOS/EOT scale; switch the special positions off first")
        if self.progress < 1.0:
            raise WorkbenchError(f"{site} is still being handed over from its live scale (--bridge "
                                 f"{self.handover.name}); give the cool-down at least as many steps as the hand-over")
        return self.sigma.detach().double()

    def ordinary_scale(self) -> Tensor:
        return self.sigma

    def _center(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.centers else x

    def _mask(self, mask: Tensor, x: Tensor) -> Tensor:
        """A [batch, pos, 1] position mask shaped for ``x`` ([batch, pos, head, d] for a per-head norm)."""
        return mask.reshape(*mask.shape[:2], *([1] * (x.dim() - 2)))

    def _scale(self, x: Tensor) -> Tensor:
        if not self.special:
            return self.sigma.reshape(1, 1, 1) if self.sigma.dim() == 0 else self.sigma
        p = self.positions
        bos, eot = self.sigma_bos, self.sigma_eot
        if self.special_blend > 0:
            b = self.special_blend
            bos, eot = bos.pow(1 - b) * self.sigma.pow(b), eot.pow(1 - b) * self.sigma.pow(b)
        return torch.where(self._mask(p.bos, x), bos, torch.where(self._mask(p.eot, x), eot, self.sigma))

    @torch.no_grad()
    def _follow(self, xc: Tensor) -> None:
        """EMA of σ (each head's, for a per-head norm) towards the live scale of this batch's ordinary
        positions (all ranks agree)."""
        sq = xc.pow(2).mean(-1, keepdim=True)
        if self.special:
            keep = self._mask(self.positions.ordinary(), sq)
        else:
            keep = self._mask(~self.positions.sink_mask, sq) if self._sink_on() else torch.ones_like(sq)
        keep = keep.to(sq.dtype).expand_as(sq)
        stats = torch.stack([(sq * keep).sum((0, 1)), keep.sum((0, 1))])  # [2, (head,) 1]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        if (stats[1] > 0).all():
            live = (stats[0] / stats[1]).sqrt().reshape(self.sigma.shape)
            self.sigma.mul_(1 - self.ema).add_(self.ema * live)

    def _handed_over(self, xc: Tensor, frozen: Tensor) -> Tensor:
        if self.progress >= 1.0:
            self.observed = {}
            return frozen
        live = self._live(xc)
        with torch.no_grad():
            self.observed = self.handover.observe(live, frozen, self.progress)
        return self.handover.scale(live, frozen, self.progress)

    def _sink_on(self) -> bool:
        return self.positions is not None and self.positions.sink_mask is not None

    def _at_sink(self, xc: Tensor, scale: Tensor) -> Tensor:
        """``scale`` with position 0's replaced by its live one (with a sink prefix)."""
        if not self._sink_on():
            return scale
        live = self._live(xc)
        return torch.where(self._mask(self.positions.sink_mask, xc), live, scale)

    def _live(self, xc: Tensor) -> Tensor:
        return (xc.pow(2).mean(-1, keepdim=True) + self.live_eps).sqrt()

    def forward(self, x, hook_scale):
        xc = self._center(x)
        if self.training and self.ema > 0:
            self._follow(xc.detach().float())
        scale = self._at_sink(xc, self._handed_over(xc, self._scale(x)))
        if self.training and self.guard:
            live = self._live(xc.float()).to(scale.dtype)
            with torch.no_grad():  # the metrics file's share of positions capped
                self.observed = {**self.observed, "guarded": (live > self.guard * scale).float().mean()}
            scale = soft_cap(scale, live, self.guard)
        return xc / hook_scale(scale)

    def frozen(self, x):
        s = self._at_sink(self._center(x), self._scale(x))
        return (lambda c: self._center(c) / s), torch.zeros_like(x)

    def extra_repr(self) -> str:
        sigma = f"{self.sigma.item():.4g}" if self.sigma.dim() == 0 else f"{self.sigma.flatten().tolist()}"
        return (f"sigma={sigma}, centers={self.centers}, special={self.special}, ema={self.ema}, "
                f"handover={self.handover.name}" + (f", guard={self.guard:g}" if self.guard else ""))
