"""The one optimizer rule of training and fine-tuning (LayerNorm removal): AdamW, with weight decay on
the weight matrices only (``W_*``: embeddings, projections, unembedding) — biases, norm gains and DyT's
alpha are not pulled toward zero, whatever their shape (attention biases are [heads, d_head] matrices
of numbers, not weights).

AdamW runs as torch's fused kernel where every parameter is a plain floating tensor on the CPU or a GPU
(on SmolLM2-135M's parameters the fused step is several times faster than the per-tensor loop;
docs/benchmarks.md); sharded (FSDP) parameters keep torch's default. How the step is computed belongs to
this machine, not to a checkpoint: ``load_state`` restores the state and keeps the implementation."""

from __future__ import annotations

from typing import Any

import torch

# AdamW's param-group keys that choose an implementation rather than hold state.
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def decays(name: str) -> bool:
    return name.split(".")[-1].startswith("W_")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain floating tensors on the CPU or CUDA."""
    return bool(params) and all(type(p.data) is torch.Tensor and p.dtype.is_floating_point
                                and p.device.type in ("cpu", "cuda") for p in params)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    fused = fusable([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def load_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping the optimizer's own implementation: torch would take
    the saved groups' (a checkpoint written by the per-tensor loop would switch the fused kernel off)."""
    chosen = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, chosen):
        group.update(keys)
