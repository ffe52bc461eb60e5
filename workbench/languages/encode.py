"""Batched forward passes over many short texts: the residual stream after every block, pooled per
text, and the text's total negative log-likelihood — from the same pass.

Texts are sorted by length and right-padded. No attention mask is needed: attention is causal, so the
padding after a text never reaches its positions. Every text starts with the model's document-start
token (``<|endoftext|>`` for workbench models, the tokenizer's BOS — else EOS — for Hugging Face
models), so the first real token is predicted too and position 0 — an attention sink with outsized
activations in most models — is never part of a pooled representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import WorkbenchError

POOLINGS = ("last", "mean", "weighted")  # weighted: position-weighted mean (weight ∝ position), as MEXA pools


@dataclass
class TextModel:
    """What the encoder needs from a model, whichever family it comes from."""

    name: str
    n_layers: int
    max_tokens: int
    bos: int
    tokenize: Callable[[str], list[int]]
    run: Callable[[Tensor, Callable], Tensor]  # (tokens, on_block(layer, resid)) -> logits


def text_model(model, max_tokens: int | None = None) -> TextModel:
    """Any model of the workbench's surface (``workbench.load``): texts start with its document-start token."""
    if model.tokenizer is None:
        raise WorkbenchError("this model has no tokenizer; the Ranker needs one to read text")
    tok = model.tokenizer
    return TextModel(getattr(model, "name", "gpt"), model.cfg.n_layers, min(max_tokens or 1024, model.cfg.n_ctx),
                     model.bos_token_id, lambda s: tok.encode(s, add_special_tokens=False).ids, _hooked_run(model))


def _hooked_run(hooked) -> Callable:
    n_layers = hooked.cfg.n_layers

    def run(tokens: Tensor, on_block: Callable) -> Tensor:
        hooks = [(f"blocks.{layer}.hook_resid_post", lambda x, hook, layer=layer: on_block(layer, x))
                 for layer in range(n_layers)]
        with hooked.hooks(fwd_hooks=hooks):
            return hooked(tokens, return_type="logits")
    return run


@dataclass
class Encoded:
    pooled: Float[Tensor, "text layer d_model"]  # from the text's first max_tokens tokens (the first pooling)
    nll: Float[Tensor, " text"]  # nats, summed over every token of the text (long texts: strided windows)
    n_tokens: list[int]
    truncated: list[bool]  # the representation saw only the first max_tokens tokens
    by_pooling: dict[str, Tensor] | None = None  # every pooling asked for, from the same pass
    # (pooling, text, c) -> [layer, d_model]: the pooling over only the first c content tokens — what the
    # text cut to c tokens would give, since attention is causal (the length-matched control)
    at_cut: dict[tuple[str, int, int], Tensor] | None = None


def _pool_at(x: Tensor, rows: Tensor, cuts: Tensor, pooling: str) -> Tensor:
    """Pool row ``rows[k]`` of ``x`` over its content positions 1..cuts[k] (position 0 is the start token).
    Rows may repeat (one text, many cuts): the running sums are taken once per row of ``x``."""
    if pooling == "last":
        return x[rows, cuts]
    body = x[:, 1:]  # content positions 1..T-1 → index 0..T-2
    if pooling == "weighted":
        body = body * torch.arange(1, x.shape[1], dtype=x.dtype)[None, :, None]
        norm = cuts * (cuts + 1) / 2
    else:
        norm = cuts
    return body.cumsum(1)[rows, cuts - 1] / norm[:, None].to(x.dtype)


def _pool(x: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """Each row pooled over its content; an empty text (no content token) pools its start token under
    every pooling, alone in its batch or padded."""
    start_or_last = x[torch.arange(len(lengths)), lengths - 1]
    if pooling == "last" or x.shape[1] == 1:
        return start_or_last
    body = _pool_at(x, torch.arange(len(lengths)), (lengths - 1).clamp_min(1), pooling)
    return torch.where((lengths == 1)[:, None], start_or_last, body)


def _windows(ids: list[int], width: int) -> list[tuple[int, int]]:
    """(start, first scored) of the strided windows over a long text's tokens: every token is scored
    once, in the window where it has at least half a window of context (the first window scores all)."""
    out, stride = [(0, 0)], max(1, width // 2)
    start = 0
    while start + width < len(ids):
        start += stride
        out.append((start, start + width - stride))
    return out


@torch.no_grad()
def encode_texts(tm: TextModel, texts: list[str], pooling: str | tuple[str, ...] = "last", batch_tokens: int = 4096,
                 progress: bool = False, desc: str = "encoding", cuts: dict[int, set[int]] | None = None) -> Encoded:
    """Pooled per-layer residual streams and summed NLL of every text, in the order given.

    ``pooling``: one pooling or several (all from the same pass; ``pooled`` is the first).
    ``cuts``: {text: content-token counts} — also pool each of those texts over only its first c tokens."""
    poolings = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    for p in poolings:
        if p not in POOLINGS:
            raise WorkbenchError(f"unknown pooling {p!r}; choose one of: {', '.join(POOLINGS)}")
    width = tm.max_tokens - 1  # content tokens per window, after the start token
    body = [tm.tokenize(t) for t in texts]
    segs = _segments(tm, body, width)
    pooled: dict[str, Tensor] = {}
    at_cut: dict[tuple[str, int, int], Tensor] = {}
    nll = torch.zeros(len(texts), dtype=torch.float64)
    bar = tqdm(total=sum(len(s[1]) for s in segs), unit="tok", desc=desc, disable=not progress, leave=False)
    for batch in _batches(segs, batch_tokens):
        _encode_batch(tm, segs, batch, poolings, cuts, pooled, at_cut, nll)
        bar.update(sum(len(segs[s][1]) for s in batch))
    bar.close()
    return Encoded(pooled[poolings[0]], nll, [len(b) for b in body], [len(b) > width for b in body],
                   by_pooling=pooled, at_cut=at_cut)


def _segments(tm: TextModel, body: list[list[int]], width: int) -> list[tuple[int, list[int], int, bool]]:
    """Every text's windows as segments: (text, tokens with the start token, first scored position, is the
    representation window)."""
    segs: list[tuple[int, list[int], int, bool]] = []
    for k, ids in enumerate(body):
        for start, scored in _windows(ids, width):
            segs.append((k, [tm.bos] + ids[start: start + width], 1 + scored - start, start == 0))
    return segs


def _batches(segs: list[tuple[int, list[int], int, bool]], batch_tokens: int) -> list[list[int]]:
    """Segment indices grouped into batches of at most ``batch_tokens`` padded tokens (a segment longer
    than that gets a batch of its own)."""
    order = sorted(range(len(segs)), key=lambda s: -len(segs[s][1]))
    batches, cur = [], []
    for s in order:  # longest first: a batch is as long as its first segment
        if cur and (len(cur) + 1) * len(segs[cur[0]][1]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    if cur:
        batches.append(cur)
    return batches


def _encode_batch(tm: TextModel, segs: list[tuple[int, list[int], int, bool]], batch: list[int],
                  poolings: tuple[str, ...], cuts: dict[int, set[int]] | None, pooled: dict[str, Tensor],
                  at_cut: dict[tuple[str, int, int], Tensor], nll: Tensor) -> None:
    """One forward pass over a batch of segments, adding to the running ``pooled``, ``at_cut`` and ``nll``."""
    lengths = torch.tensor([len(segs[s][1]) for s in batch])
    tokens = torch.full((len(batch), int(lengths.max())), tm.bos, dtype=torch.long)
    for row, s in enumerate(batch):
        tokens[row, : lengths[row]] = torch.tensor(segs[s][1])
    primary = [row for row, s in enumerate(batch) if segs[s][3]]
    # (row, c) for every cut asked of a text whose representation window is in this batch
    wanted = [(row, c) for row in primary for c in sorted((cuts or {}).get(segs[batch[row]][0], ()))
              if 1 <= c < int(lengths[row])]
    cut_rows = torch.tensor([r for r, _ in wanted], dtype=torch.long)
    cut_at = torch.tensor([c for _, c in wanted], dtype=torch.long)
    states: dict[tuple[str, int], Tensor] = {}
    cut_states: dict[tuple[str, int], Tensor] = {}

    def on_block(layer, x):
        x = x.float()
        for p in poolings:
            states[p, layer] = _pool(x, lengths, p)
            if wanted:
                cut_states[p, layer] = _pool_at(x, cut_rows, cut_at, p)

    logits = tm.run(tokens, on_block)
    d = states[poolings[0], 0].shape[-1]
    for p in poolings:
        out = pooled.setdefault(p, torch.zeros(len(nll), tm.n_layers, d))
        out[[segs[batch[r]][0] for r in primary]] = torch.stack(
            [states[p, layer][primary] for layer in range(tm.n_layers)], dim=1)
        if wanted:
            stacked = torch.stack([cut_states[p, layer] for layer in range(tm.n_layers)], dim=1)
            for k, (row, c) in enumerate(wanted):
                at_cut[p, segs[batch[row]][0], c] = stacked[k]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    pos = torch.arange(1, tokens.shape[1])[None, :]  # the position of each predicted token
    first = torch.tensor([segs[s][2] for s in batch])[:, None]
    scored = (pos < lengths[:, None]) & (pos >= first)
    nll.index_add_(0, torch.tensor([segs[s][0] for s in batch]), -(logp * scored).sum(1).double())
