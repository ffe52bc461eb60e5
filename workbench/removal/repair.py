"""Vocabulary repair: shrink the input embedding of the tokens a norm-free model runs away on.

A norm-free model is fine-tuned only on the tokens its corpus holds. On SmolLM2 half the vocabulary never
occurs in ``english``, and a few hundred of those ids (0.8 %: word pieces such as ``' dissemin'``, code such
as ``' pathlib'``) enter a feedback the norms used to stop: the position's residual grows block by block,
the gated MLPs square it, attention copies it, and the window overflows (docs/ln_removal.md, tenth
session). Their embedding rows were never trained against the frozen σ. The repair finds them — every id
behind the document-start token and behind a few text tokens, then the sources of runaways in windows of
random tokens (and, asked for, of the corpus's training text) — and multiplies each one's row by ``shrink``
until its residual stays within ``threshold`` times the text's RMS at every block. A token the corpus holds
often is never blamed by a searched window: a runaway can show first where attention copies it (``' The'``
in S15r), and shrinking such a token costs text CE without stopping anything. Nothing else changes: the blocks, the unembedding and every other row
are the model's own, so DLA stays exact and text without those ids gives the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import WorkbenchError
from .options import opt
from .robustness import random_windows


@dataclass
class VocabRepair:
    threshold: float = opt(4.0, "a token runs away when its residual RMS exceeds this multiple of the text's RMS "
                                "at some block")
    shrink: float = opt(0.5, "each round multiplies a runaway token's embedding row by this")
    rounds: int = opt(8, "rounds of shrinking at most")
    random_windows: int = opt(64, "windows of random tokens (behind the document-start token) searched for "
                                  "runaway sources beyond single tokens")
    seed: int = opt(1, "seed of the random windows (robustness checks use seed 0)")
    # A runaway can need its context (S16's last one grew at an ordinary position of a text window). Off by
    # default: on S17 its only two finds were false positives, blamed and shrunk in every round (docs).
    corpus_windows: int = opt(0, "windows of the fine-tuning corpus's training split searched for runaway "
                                 "sources in running text, as the random windows are (0: off)")
    protect_seen: int = opt(8, "a token the fine-tuning corpus holds at least this many times is never blamed by "
                               "the searched windows (a runaway shows first where attention copies it); 0: none")
    batch: int = 512

    def __post_init__(self) -> None:
        if not self.threshold > 1:
            raise WorkbenchError(f"--threshold must be above 1 (a multiple of the text's RMS), got {self.threshold}")
        if not 0 < self.shrink < 1:
            raise WorkbenchError(f"--shrink must be in (0, 1), got {self.shrink}")
        if (self.rounds < 1 or self.random_windows < 0 or self.batch < 1 or self.protect_seen < 0
                or self.corpus_windows < 0):
            raise WorkbenchError("--rounds must be ≥ 1, --random-windows, --corpus-windows and --protect-seen ≥ 0")


def _rms(x: Tensor) -> Tensor:
    return torch.nan_to_num(x.float().pow(2).mean(-1).sqrt(), nan=torch.inf)


@torch.no_grad()
def text_rms(model, windows: list[Int[Tensor, "batch pos"]]) -> Float[Tensor, "n_layers"]:
    """Per block, the median RMS of the residual over the text's positions (after position 0)."""
    shift = 0 if model.sink_token is not None else 1  # behind a prefix the outputs start at position 1
    per = [torch.cat([_rms(o[:, shift:]).flatten() for o in model.block_outputs(w)]).view(len(model.blocks), -1)
           for w in windows]
    return torch.cat(per, 1).median(1).values


@torch.no_grad()
def token_ratios(model, tokens: Int[Tensor, "n"], prefix: Int[Tensor, "p"], scale: Float[Tensor, "n_layers"],
                 batch: int = 512) -> Float[Tensor, "n"]:
    """Each token placed after ``prefix``: the largest, over blocks, of its residual RMS over ``scale``."""
    out = []
    for chunk in tokens.split(batch):
        w = torch.cat([prefix.expand(len(chunk), -1), chunk[:, None]], 1)
        out.append(torch.stack([_rms(o[:, -1]) / s for o, s in zip(model.block_outputs(w), scale)]).amax(0))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def window_sources(model, windows: Int[Tensor, "batch pos"], scale: Float[Tensor, "n_layers"],
                   threshold: float, protected: Bool[Tensor, "vocab"] | None = None) -> list[int]:
    """The ids where runaways start: in each window, the leftmost position above ``threshold`` at the first
    block where any is (causal attention copies a runaway only to later positions, already in that block).
    Positions holding a ``protected`` id are passed over, so the blame falls on the first unprotected
    position to cross, at the block where one first does."""
    shift = 1 if model.sink_token is not None else 0
    ratios = torch.stack([_rms(o) / s for o, s in zip(model.block_outputs(windows), scale)])  # layer, batch, pos
    found = []
    for b in range(windows.shape[0]):
        over = ratios[:, b] > threshold
        if protected is not None:
            over &= ~protected[windows[b, shift:]]
        layers = over.any(1).nonzero()
        if len(layers):
            found.append(int(windows[b, int(over[int(layers[0])].nonzero()[0]) + shift]))
    return sorted(set(found))


def _runaways(model, scale: Tensor, cfg: VocabRepair, contexts: dict[str, Tensor], ids: Tensor,
              searched: dict[str, Tensor], protected: Tensor | None) -> tuple[dict[int, str], Tensor]:
    """The ids among ``ids`` over the threshold after some context, and the sources of runaways in the
    ``searched`` windows (name → windows): id → where it was found; and each of ``ids``' largest ratio over
    the contexts."""
    bad: dict[int, str] = {}
    worst = torch.zeros(len(ids))
    for name, prefix in contexts.items():
        r = token_ratios(model, ids, prefix, scale, cfg.batch)
        worst = torch.maximum(worst, r)
        for i in (r > cfg.threshold).nonzero().flatten().tolist():
            bad.setdefault(int(ids[i]), name)
    for name, windows in searched.items():
        for chunk in windows.split(max(1, cfg.batch // windows.shape[1])) if len(windows) else ():
            for t in window_sources(model, chunk, scale, cfg.threshold, protected):
                bad.setdefault(t, name)
    return bad, worst


@torch.no_grad()
def repair_vocab(model, text: list[Int[Tensor, "batch pos"]], cfg: VocabRepair,
                 counts: Int[Tensor, "vocab"] | None = None,
                 corpus: Int[Tensor, "batch pos"] | None = None) -> dict[str, Any]:
    """Shrink the embedding rows of the tokens ``model`` runs away on (in place); returns the table (one row
    per token: id, text, where found, its ratio before and after, the factor its row got) and whether every
    context and searched window ended below the threshold. ``counts`` (each id's count in the fine-tuning
    corpus) protects the ids seen ``cfg.protect_seen`` times or more from the windows' blame; ``corpus``
    (training windows, each starting with the document-start token) is searched beside the random ones."""
    if not model.cfg.scheme.pre_norm_free(model.cfg.norm_context):
        raise WorkbenchError("repair-vocab is for a norm-free model (remove-ln's output); this one still has "
                             "norms, which keep every token's scale")
    model.eval()
    scale = text_rms(model, text)
    first = text[0][0]
    contexts = {"after the first token": first[:1], "after 4 text tokens": first[:4]}
    randoms = random_windows(model.cfg.d_vocab, cfg.random_windows, text[0].shape[1], int(first[0]), cfg.seed)
    protected = counts >= cfg.protect_seen if counts is not None and cfg.protect_seen > 0 else None
    searched = {"random windows": randoms}
    if corpus is not None and len(corpus):
        searched["corpus windows"] = corpus
    bad, before = _runaways(model, scale, cfg, contexts, torch.arange(model.cfg.d_vocab), searched, protected)
    found, factor = dict(bad), {}
    for _ in range(cfg.rounds):
        if not bad:
            break
        model.embed.W_E[torch.tensor(sorted(bad))] *= cfg.shrink
        for t, where in bad.items():
            factor[t] = factor.get(t, 1.0) * cfg.shrink
            found.setdefault(t, where)
        bad, after = _runaways(model, scale, cfg, contexts, torch.tensor(sorted(factor)), searched, protected)
    ids = sorted(factor)
    after = dict(zip(ids, after.tolist())) if ids else {}
    table = [{"token": t, "text": model.tokenizer.decode([t]) if model.tokenizer is not None else None,
              "found_by": found[t], "ratio_before": before[t].item(), "factor": factor[t], "ratio_after": after[t]}
             for t in ids]
    return {"text_rms": scale.tolist(), "tokens": table, "repaired": len(table), "converged": not bad,
            "still_running_away": sorted(bad), "protected": int(protected.sum()) if protected is not None else 0}


__all__ = ["VocabRepair", "repair_vocab", "text_rms", "token_ratios", "window_sources"]
