"""Model + training presets. ``tiny``: about a minute a model on 2 CPU cores. ``small``: 12 layers,
deep enough for the depth effects (variance growth, gradient profiles) to show."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import WorkbenchError


@dataclass(frozen=True)
class Preset:
    model: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        model=dict(n_layers=2, d_model=128, n_heads=4, n_ctx=128, d_vocab=2048),
        train=dict(steps=500, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=50, eval_batches=8),
    ),
    "small": Preset(
        model=dict(n_layers=12, d_model=128, n_heads=4, n_ctx=128, d_vocab=4096),
        train=dict(steps=1000, batch_size=16, lr=1.5e-3, warmup_steps=100, eval_every=100, eval_batches=8),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise WorkbenchError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
