"""What every training loop here shares: the process group, the device, a rank's share of the global
batch, the learning-rate shape and evaluation. ``train`` (pre-training) and ``removal`` (the LN-removal
fine-tune) both use it; the weight-decay rule and the optimizer are ``workbench.optim``'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor

from .errors import WorkbenchError
from .model.gpt import lm_cross_entropy


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: Int[Tensor, "batch pos"]) -> Int[Tensor, "local pos"]:
        """This rank's contiguous slice of the global batch (its size divisible by ``world``)."""
        local = len(batch) // self.world
        return batch[self.rank * local:(self.rank + 1) * local]


def init_distributed() -> Dist:
    """Joins the process group under torchrun (gloo on CPU, nccl on GPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return current()


def current() -> Dist:
    """The process group as it stands (no initialization)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def resolve_device(device: str | None, group: Dist | None = None) -> torch.device:
    """The device asked for (default: cuda if visible); under torchrun each rank takes its LOCAL_RANK GPU."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise WorkbenchError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise WorkbenchError(f"unknown device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and group is not None and group.world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def warmup_cosine(step: int, peak: float, warmup: int, decay_start: int, decay_steps: int, min_ratio: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up to ``peak`` over ``warmup`` steps,
    then a cosine from ``peak`` at ``decay_start`` to ``peak·min_ratio`` ``decay_steps`` later, flat after."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - decay_start) / max(1, decay_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], batches: list[Tensor], device: torch.device,
             before: Callable[[Tensor], None] | None = None) -> float:
    """Mean next-token cross-entropy (nats) of ``forward``'s logits over ``batches``; ``before(batch)`` runs
    first for each (a removal sets its special positions there). The caller picks the mode and precision:
    both loops here evaluate in eval mode and float32."""
    losses = []
    for b in batches:
        b = b.to(device)
        if before is not None:
            before(b)
        losses.append(lm_cross_entropy(forward(b), b).item())
    return sum(losses) / len(losses)


__all__ = ["Dist", "current", "evaluate", "init_distributed", "resolve_device", "warmup_cosine"]
