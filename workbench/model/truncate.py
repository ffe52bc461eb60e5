"""A model's first N blocks with its final norm and unembedding: a cheaper real test bed.

SmolLM2's massive activation appears at the residual entering layer 12 (docs/ln_removal.md): its
first 14 blocks carry the real obstacle of norm removal at about half the cost of a step. The result is
the same family (a Llama stays a Llama, exported as one), and ``truncate`` checks itself: its logits
must equal the original's final norm and unembedding applied to the residual after block N−1, read
from the original's cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import WorkbenchError
from .gpt import GPT


def check_truncatable(model: GPT, n_layers: int) -> None:
    cfg = model.cfg
    if not 1 <= n_layers <= cfg.n_layers:
        raise WorkbenchError(f"--layers must be between 1 and the model's {cfg.n_layers} layers, got {n_layers}")
    short = replace(cfg, n_layers=n_layers)
    # A scheme whose placement depends on the depth (Mix-LN's Post-LN share) would change the kept blocks.
    for layer in range(n_layers):
        if cfg.scheme.placement(cfg.norm_context, layer) != short.scheme.placement(short.norm_context, layer):
            raise WorkbenchError(f"{cfg.norm}: block {layer}'s placement depends on the model's depth, so its first "
                                 f"{n_layers} blocks are not the same blocks; truncate a scheme with one placement")


@torch.no_grad()
def truncate(model: GPT, n_layers: int) -> GPT:
    """A new GPT holding copies of ``model``'s embedding, blocks 0..n_layers−1, final norm and unembedding."""
    check_truncatable(model, n_layers)
    short = GPT(replace(model.cfg, n_layers=n_layers), model.tokenizer)
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < n_layers}
    short.load_state_dict(kept)
    return short.to(next(model.parameters()).device).eval()


@torch.no_grad()
def truncation_error(model: GPT, short: GPT, tokens: Int[Tensor, "batch pos"]) -> float:
    """Largest |logit difference| between ``short`` and the original's unembed(ln_final(resid after block
    N−1)), the residual read from the original's cache: 0 up to float rounding when the cut is exact."""
    n = short.cfg.n_layers
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{n - 1}.hook_resid_post")
    expected = model.final_logits(cache[f"blocks.{n - 1}.hook_resid_post"])
    return (short(tokens) - expected).abs().max().item()


__all__ = ["check_truncatable", "truncate", "truncation_error"]
