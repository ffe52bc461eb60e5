"""The one optimizer rule of training and fine-tuning (LayerNorm removal): AdamW, with weight decay on
the weight matrices only (``W_*``: embeddings, projections, unembedding) — biases, norm gains and DyT's
alpha are not pulled toward zero, whatever their shape (attention biases are [heads, d_head] matrices
of numbers, not weights)."""

from __future__ import annotations

from typing import Any

import torch


def decays(name: str) -> bool:
    return name.split(".")[-1].startswith("W_")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
