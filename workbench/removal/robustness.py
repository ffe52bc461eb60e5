"""Where a norm-free model still works: held-out text, prompts that start with BOS, random tokens and a
long context, each as one row of a tidy table (CE, the largest final-residual entry, finite or not).

A norm-free model divides every position by one constant, so an input unlike its fine-tuning windows —
position 0 holding BOS (SmolLM2's attention sink), tokens in no natural order, more positions than
the windows had — can grow its residual without bound. The table states the limit instead of leaving
it to be found (issue 24, item 6).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..batches import TokenData
from ..model.gpt import lm_cross_entropy


def random_windows(d_vocab: int, count: int, n_ctx: int, first: int | Tensor, seed: int) -> Int[Tensor, "count pos"]:
    """``count`` windows of uniformly random ids behind ``first`` (the document start every corpus window has,
    a sink prefix's token): a pure function of the seed. Seed 0 is the robustness probe's, 1 repair-vocab's
    search; a held-out check uses another."""
    w = torch.randint(0, d_vocab, (count, n_ctx), generator=torch.Generator().manual_seed(seed))
    w[:, 0] = first
    return w


@torch.no_grad()
def probe(model, tokens: Int[Tensor, "batch pos"], name: str) -> dict[str, Any]:
    """CE (nats, float32) and the largest |entry| of the last residual on ``tokens``; finite or not."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(tokens, names_filter=last)
    ce = lm_cross_entropy(logits.float(), tokens).item()
    peak = cache[last].abs().max().float().item()
    finite = bool(torch.isfinite(logits).all()) and bool(torch.isfinite(cache[last]).all())
    return {"probe": name, "sequences": tokens.shape[0], "positions": tokens.shape[1], "ce": ce,
            "max_abs_resid": peak, "finite": finite}


def bos_prefixed(windows: Int[Tensor, "batch pos"], bos: int) -> Int[Tensor, "batch pos"]:
    """Each window with BOS in front, keeping its length: [BOS, t_0, …, t_{n−2}]."""
    return torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)


def robustness(model, data: TokenData, n_ctx: int, device: torch.device, sequences: int = 8,
               long_ctx: int = 1024, seed: int = 0) -> list[dict[str, Any]]:
    """The table's rows for ``model``: ``sequences`` held-out windows of the fine-tuning length, the same
    windows behind BOS, as many random-token windows, and one held-out window of ``long_ctx`` tokens
    (capped at the model's context and the validation text's length)."""
    model.eval()
    held_out = data.val_batches(1, sequences, n_ctx)[0].to(device)
    random = random_windows(model.cfg.d_vocab, sequences, n_ctx, held_out[:, 0].cpu(), seed).to(device)
    rows = [probe(model, held_out, "held-out text"), probe(model, random, "random tokens")]
    if model.tokenizer is not None:  # the prompt a user types: BOS first (what `to_tokens` prepends)
        rows.insert(1, probe(model, bos_prefixed(held_out, model.bos_token_id), "held-out text after BOS"))
    longest = min(long_ctx, model.cfg.n_ctx, len(data.val))
    if longest > n_ctx:
        rows.append(probe(model, data.val_batches(1, 1, longest)[0].to(device), f"held-out text, {longest} tokens"))
    return rows


__all__ = ["bos_prefixed", "probe", "random_windows", "robustness"]
