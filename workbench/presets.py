"""Model + training presets. ``tiny``: under a minute a model on 2 CPU cores. ``small``: 12 layers,
deep enough for the depth effects (variance growth, gradient profiles) to show; about 3 minutes a model
on 2 CPU cores in bfloat16. ``medium``: 24 layers at d_model 256, where the Curse of Depth's effects
(variance growth, deep blocks that can be skipped) have room to appear — a GPU preset (docs/zoo.md gives
its time per model; hours on 2 CPU cores)."""

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
    # 8.2 M training tokens: 2.2 passes over the bundled corpus's 3.6 M (at vocabulary 4096).
    "medium": Preset(
        model=dict(n_layers=24, d_model=256, n_heads=8, n_ctx=256, d_vocab=4096),
        train=dict(steps=2000, batch_size=16, lr=1e-3, warmup_steps=200, eval_every=200, eval_batches=8),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise WorkbenchError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
