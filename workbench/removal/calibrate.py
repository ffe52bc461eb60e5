"""Calibrate-then-freeze: measure a live norm's per-token scale, then swap it for one frozen σ.

The one implementation behind ``remove-ln`` (each event of the schedule) and the probes in
``analyses/`` (freezing norms without fine-tuning, to see what each costs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor

from ..norms import Norm
from ..norms.frozen import FrozenStandardize, SpecialPositions
from ..norms.handover import HandOver
from ..runtime import current
from .method import percentile


@torch.no_grad()
def calibrate(adapter, norm: Norm, batch: Int[Tensor, "batch pos"], positions: SpecialPositions,
              chunk: int | None = None, statistic: str = "rms") -> dict[str, Any]:
    """σ from the live per-token scale s_t: over ordinary positions sqrt(mean s_t²) ("rms"), median s_t
    ("median") or a percentile ("qNN"); BOS and EOT positions pooled separately (always rms). Under a
    process group every rank contributes its share of the batch and all get the same σ. A per-head norm
    (QK-norm, ``hook_scale`` [batch, pos, head, 1]) gets one σ per head: each value is then a list."""
    stats, ordinary_scales = None, []
    for part in batch.split(chunk or len(batch)):
        captured: list[Tensor] = []
        norm.hook_scale.add_hook(lambda act, hook: captured.append(act.detach().float()))
        try:
            positions.update(part)
            adapter.net(part)
        finally:
            norm.hook_scale.remove_hooks("fwd")
        s = captured[0].expand(*part.shape, *captured[0].shape[2:]).reshape(*part.shape, -1)  # [batch, pos, head]
        masks = (positions.ordinary(), positions.bos, positions.eot)
        part_stats = torch.stack([torch.stack([(s.pow(2) * m).sum((0, 1)), m.sum().float().expand(s.shape[-1])])
                                  for m in masks]).double()  # [3, 2, head]
        stats = part_stats if stats is None else stats + part_stats
        ordinary_scales.append(s[masks[0].squeeze(-1)].double().cpu())  # [n, head]
    world = current().world
    if world > 1:
        dist.all_reduce(stats)
    names = ("sigma", "sigma_bos", "sigma_eot")
    out = {k: _per_head([math.sqrt(s / n) if n > 0 else None for s, n in zip(*pair.tolist())])
           for k, pair in zip(names, stats)}
    if statistic != "rms":
        local = torch.cat(ordinary_scales)
        if world > 1:
            everyone: list = [None] * world
            dist.all_gather_object(everyone, local)
            local = torch.cat(everyone)
        q = percentile(statistic)
        value = local.median(0).values if q is None else torch.quantile(local, q / 100, dim=0)
        out["sigma_rms"], out["sigma"] = out["sigma"], _per_head(value.tolist())
    return out


def _per_head(values: list[float | None]) -> float | list[float] | None:
    """One σ as a float (one per token), several as a list (one per head); None where no position counted."""
    if any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else values


def finite(entry: dict[str, Any]) -> bool:
    """Whether every σ of a calibration is a finite number (None: no such positions)."""
    values = [v for k, v in entry.items() if k.startswith("sigma") and v is not None]
    return all(math.isfinite(x) for v in values for x in (v if isinstance(v, list) else [v]))


def freeze(norm: Norm, entry: dict[str, Any], positions: SpecialPositions | None, ema: float = 0.0,
           handover: HandOver | None = None, frozen_at: int = 0,
           device: torch.device | str = "cpu", guard: float = 0.0) -> FrozenStandardize:
    """Swap ``norm``'s live standardization for a frozen one at the calibrated σ of ``entry`` (its BOS and
    EOT σ kept apart while the special positions are on); a gradual ``handover`` starts at ``frozen_at``;
    ``guard`` soft-caps its output in training (``FrozenStandardize``)."""
    live = norm.standardize
    st = FrozenStandardize(entry["sigma"], live.centers, positions, entry["sigma_bos"],
                           entry["sigma_eot"] or entry["sigma_bos"], ema, handover=handover,
                           live_eps=live.live_rms_eps, frozen_at=frozen_at, guard=guard)
    norm.standardize = st.to(device)
    return st


def calibrate_and_freeze(adapter, norm: Norm, batch: Int[Tensor, "batch pos"], positions: SpecialPositions,
                         statistic: str = "rms", chunk: int | None = None) -> tuple[dict[str, Any], FrozenStandardize]:
    """Calibrate ``norm`` on ``batch`` and freeze it at once (no hand-over, no EMA): what a probe needs."""
    entry = calibrate(adapter, norm, batch, positions, chunk, statistic)
    return entry, freeze(norm, entry, positions, device=batch.device)


__all__ = ["calibrate", "calibrate_and_freeze", "finite", "freeze"]
