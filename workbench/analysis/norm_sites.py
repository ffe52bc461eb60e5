"""Norms on a prompt: every norm site's scale per token, and the logit lens with the final norm applied two ways.

Dimensions: layer (of the residual stream), pos, head (per-head QK-norm sites), d_model, d_vocab; one prompt.

A *site* is every workbench ``Norm`` the model holds, named by its module path — ``blocks.3.ln1``,
``blocks.3.ln1_post``, ``blocks.3.attn.q_norm``, ``ln_final`` — and its scale is that module's
``hook_scale`` as ``run_with_cache`` records it. Sites are found by walking the modules, never by the
model's family or its norm's name, so a new scheme or family needs nothing here.

The logit lens reads an earlier residual h_ℓ through the final norm and the unembedding. Two ways:

- ``recomputed``: ``model.final_logits(h_ℓ)``, ln_final's statistic computed on h_ℓ itself — what the
  model would predict had it stopped after block ℓ.
- ``frozen``: h_ℓ divided by the *last* residual's scale, cached at ln_final (its ``frozen()``
  linearization at h_L), then the same gain, unembedding and soft-cap. This is what TransformerLens'
  ``accumulated_resid(apply_ln=True)`` did before its bug #1076 was fixed; shown beside the recomputed
  lens because the two part wherever the residual's scale grows with depth.

Positions are token positions. Behind an attention-sink prefix (``model/sink.py``) the model computes
positions 1, 2, … only: position 0's norms ran once, when the prefix was captured, and its residual stream
is not kept, so both tables start at position 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import WorkbenchError
from ..model import GPT
from ..model.components import soft_cap
from ..norms import Norm
from .positions import SINK_POSITION_0, first_computed, require_computed

# Said wherever the frozen lens is missing: what the final norm lacks, and why nothing is lost.
NO_FROZEN = ("the frozen lens needs a final norm that divides each token by its own scale (hook_scale [batch, pos, "
             "1]); this model's ln_final does not (identity, batch statistics, one frozen σ, DyT), so only the "
             "recomputed lens is given")
LENS_VALUES = {"top_prob": "top-1 probability", "ce_next": "CE of the next token (nats)",
               "answer_logprob": "log-probability of the answer", "answer_rank": "rank of the answer (0 = top)"}


def prompt_tokens(model: GPT, prompt: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"],
                  min_tokens: int = 1, what: str = "this") -> Int[Tensor, "1 pos"]:
    """The prompt's tokens (BOS first for text), refused in one line when empty, too long or with fewer than
    ``min_tokens`` positions the model computes (behind a sink prefix, position 0 is not one)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise WorkbenchError("the prompt is empty; type some text")
        tokens = model.to_tokens(prompt)
    else:
        tokens = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise WorkbenchError(f"one prompt at a time, got tokens of shape {tuple(tokens.shape)}")
    require_computed(model, tokens.shape[1], min_tokens, what)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise WorkbenchError(f"the prompt is {tokens.shape[1]} tokens but the model's context is {model.cfg.n_ctx}; "
                             "shorten it")
    return tokens.to(model.W_E.device)


def token_strings(model: GPT, tokens: Int[Tensor, "1 pos"]) -> list[str]:
    # A model built without a tokenizer (GPT(cfg)) still gets a table: its token ids as text.
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens[0]]
    return model.to_str_tokens(tokens[0])


def norm_sites(model: GPT) -> list[tuple[str, Norm]]:
    """Every norm module by its path, in the model's order; identity norms (nothing to measure) left out."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Norm) and not m.standardize.is_identity]


def site_kind(site: str) -> tuple[str, int | None]:
    """``blocks.3.attn.q_norm`` → (``q_norm``, 3); ``ln_final`` → (``ln_final``, None)."""
    parts = site.split(".")
    return parts[-1], int(parts[1]) if parts[0] == "blocks" else None


def _not_per_token(scale: Tensor, n_pos: int) -> str | None:
    """Why a cached ``hook_scale`` is not one scale per token ([1, pos, 1] or [1, pos, head, 1]); None if it is."""
    if scale.dim() in (3, 4) and scale.shape[:2] == (1, n_pos) and scale.shape[-1] == 1:
        return None
    if scale.shape[-1] > 1:
        return f"one scale per feature shared by every token (hook_scale {list(scale.shape)}: batch statistics)"
    return f"one constant for every token (hook_scale {list(scale.shape)}: DyT's 1/α, a frozen σ)"


def _site_rows(site: str, scale: Tensor, strings: list[str]) -> pd.DataFrame:
    """``strings``: every token's; the scale's positions are the last of them (behind a sink prefix, all but 0)."""
    s = scale[0, ..., 0].float().cpu()  # [pos] or [pos, head]
    per_head = s.dim() == 2
    s = s if per_head else s[:, None]
    n_pos, n_head = s.shape
    first = len(strings) - n_pos
    kind, layer = site_kind(site)
    return pd.DataFrame({
        "site": site, "kind": kind, "layer": layer,
        "head": np.tile(np.arange(n_head), n_pos) if per_head else None,
        "pos": np.repeat(np.arange(first, first + n_pos), n_head),
        "token": np.repeat(np.array(strings[first:], dtype=object), n_head),
        "scale": s.reshape(-1).double().numpy(),
    })


@torch.no_grad()
def norm_scales(model: GPT, prompt: str | Int[Tensor, "1 pos"]) -> pd.DataFrame:
    """Every norm site's scale at every token of ``prompt``: one row per site, (head,) and position.

    Columns: ``site`` (module path), ``kind`` (``ln1``, ``ln2``, ``ln1_post``, ``q_norm``, ``ln_final``, …),
    ``layer`` (None for ln_final), ``head`` (per-head QK-norm sites, else None), ``pos``, ``token``,
    ``scale`` (what the norm divides by), ``relative`` (scale / the median of that site — and head — over
    the prompt's tokens: BOS, end-of-text and massive-activation tokens stand out) and ``skipped``.
    A site whose scale is not per token (batch statistics, DyT, a frozen σ) gets one row whose
    ``skipped`` says why, its other values empty; identity norms get none. A model with no per-token
    site at all is refused in one line. Behind a sink prefix there are no rows for position 0.
    Puts the model in eval mode (running statistics are not updated).
    """
    model.eval()
    # two computed positions: [1, pos, 1] ≠ a constant [1, 1, 1]
    tokens = prompt_tokens(model, prompt, min_tokens=2, what="the norm-scale table")
    n_pos = tokens.shape[1] - first_computed(model)
    sites = norm_sites(model)
    hooks = {f"{name}.hook_scale" for name, _ in sites}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    strings = token_strings(model, tokens)
    measured, skipped = [], []
    for name, _ in sites:
        why = _not_per_token(cache[f"{name}.hook_scale"], n_pos)
        if why is None:
            measured.append(_site_rows(name, cache[f"{name}.hook_scale"], strings))
        else:
            skipped.append({"site": name, "kind": site_kind(name)[0], "layer": site_kind(name)[1], "skipped": why})
    if not measured:
        why = f"{skipped[0]['site']} (and {len(skipped) - 1} more) use {skipped[0]['skipped']}" if skipped else \
            "every norm site is the identity"
        raise WorkbenchError(f"no norm site of this model ({model.cfg.norm}) divides each token by its own scale: {why}")
    table = pd.concat(measured, ignore_index=True)
    # The median per site (and head): a robust "ordinary token", which BOS and massive tokens do not move.
    table["relative"] = table.scale / table.groupby(["site", "head"], dropna=False, sort=False).scale.transform("median")
    table["skipped"] = None
    table = pd.concat([table, pd.DataFrame(skipped)], ignore_index=True) if skipped else table
    table = table.astype({"layer": "Int64", "head": "Int64", "pos": "Int64"})
    return table[["site", "kind", "layer", "head", "pos", "token", "scale", "relative", "skipped"]]


def lens_sites(model: GPT) -> list[tuple[int, str]]:
    """(layer, hook) of the residual stream: 0 the embeddings, ℓ ≥ 1 the output of block ℓ − 1."""
    L = model.cfg.n_layers
    return [(0, "blocks.0.hook_resid_pre")] + [(l + 1, f"blocks.{l}.hook_resid_post") for l in range(L)]


def frozen_final_logits(model: GPT, resid: Float[Tensor, "layer pos d_model"],
                        final: Float[Tensor, "pos d_model"]) -> Float[Tensor, "layer pos d_vocab"]:
    """Each layer's residual read through ln_final with the statistics of ``final`` (the last residual) frozen:
    standardize(x) ≈ L(x) + k at ``final``, then the norm's own affine, depth scale, W_U and soft-cap."""
    norm = model.ln_final
    try:
        linear, const = norm.standardize.frozen(final)
    except (ValueError, NotImplementedError) as e:  # batch statistics in training mode; a norm without one
        raise WorkbenchError(str(e)) from None
    logits = model.unembed(norm.affine(linear(resid) + const) * norm.depth_scale)
    # Soft-capping is part of the model's readout: applied here too, so both lenses give comparable logits.
    cap = model.cfg.output_logits_soft_cap
    return logits if cap is None else soft_cap(logits, cap)


def _lens_rows(model: GPT, logits: Tensor, tokens: Tensor, method: str, answer: int | None,
               strings: list[str]) -> pd.DataFrame:
    n_layer, n_pos, _ = logits.shape
    first = first_computed(model)  # behind a sink prefix the logits start at token position 1
    logp = logits.float().log_softmax(-1)
    top_logp, top = logp.max(-1)
    ce = torch.full((n_layer, n_pos), float("nan"))
    ce[:, :-1] = -logp[:, :-1].gather(-1, tokens[first + 1:].expand(n_layer, -1)[..., None])[..., 0]
    names = {i: model.to_string([i]) if model.tokenizer is not None else str(i) for i in top.unique().tolist()}
    df = pd.DataFrame({
        "layer": np.repeat(np.arange(n_layer), n_pos), "pos": np.tile(np.arange(first, first + n_pos), n_layer),
        "token": strings[first:] * n_layer, "next_token": (strings[first + 1:] + [None]) * n_layer, "method": method,
        "top_token": [names[i] for i in top.reshape(-1).tolist()], "top_token_id": top.reshape(-1).numpy(),
        "top_prob": top_logp.exp().reshape(-1).numpy(), "ce_next": ce.reshape(-1).numpy(),
    })
    if answer is not None:
        df["answer_logprob"] = logp[..., answer].reshape(-1).numpy()
        # Strictly larger logits only: ties (a saturated soft-cap) do not push the answer down.
        df["answer_rank"] = (logits > logits[..., answer: answer + 1]).sum(-1).reshape(-1).numpy()
    return df


@torch.no_grad()
def logit_lens(model: GPT, prompt: str | Int[Tensor, "1 pos"], answer: str | int | None = None) -> pd.DataFrame:
    """The logit lens at every layer of the residual stream and every position, both ways (module docstring).

    Columns: ``layer`` (0 = embeddings, ℓ = after block ℓ − 1; ``n_layers`` is the model's own output),
    ``resid`` (the hook read), ``pos``, ``token``, ``next_token``, ``method`` (``recomputed`` | ``frozen``),
    ``top_token``, ``top_token_id``, ``top_prob``, ``ce_next`` (−log p of the next token; NaN at the last
    position) and, with ``answer`` (a single token), ``answer_logprob`` and ``answer_rank``.
    ``frozen`` rows exist only where ln_final divides each token by its own scale (``NO_FROZEN``).
    Behind a sink prefix there are no rows for position 0. Puts the model in eval mode.
    """
    model.eval()
    tokens = prompt_tokens(model, prompt, what="the logit lens")
    a = model.to_single_token(answer) if isinstance(answer, str) else answer
    if a is not None and not 0 <= a < model.cfg.d_vocab:
        raise WorkbenchError(f"answer token id {a} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
    sites = lens_sites(model)
    wanted = {hook for _, hook in sites} | {"ln_final.hook_scale"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    resid = torch.stack([cache[hook][0] for _, hook in sites])  # [layer, pos, d_model]
    logits = {"recomputed": model.final_logits(resid)}
    if _not_per_token(cache["ln_final.hook_scale"], resid.shape[1]) is None:
        logits["frozen"] = frozen_final_logits(model, resid, resid[-1])
    strings = token_strings(model, tokens)
    table = pd.concat([_lens_rows(model, lg.cpu(), tokens[0].cpu(), m, a, strings) for m, lg in logits.items()],
                      ignore_index=True)
    table.insert(1, "resid", table.layer.map(dict(sites)))
    return table


def lens_side_by_side(table: pd.DataFrame, pos: int = -1) -> pd.DataFrame:
    """One position of a logit-lens table (default the last), one row per layer, each method's columns beside
    the other's: ``recomputed top_token``, ``frozen top_token``, … (columns empty at that position dropped)"""
    p = int(table.pos.max()) + 1 + pos if pos < 0 else pos
    t = table[table.pos == p]
    if t.empty:
        lo, hi = int(table.pos.min()), int(table.pos.max())
        behind = f"; {SINK_POSITION_0}" if lo == 1 else ""
        raise WorkbenchError(f"the logit-lens table has no position {pos} (it covers positions {lo}–{hi}{behind}); "
                             "pick one of those")
    values = [c for c in ("top_token", "top_prob", "ce_next", "answer_logprob", "answer_rank") if c in t]
    wide = t.pivot(index="layer", columns="method", values=values)
    methods = [m for m in ("recomputed", "frozen") if m in set(t.method)]
    wide = wide.reindex(columns=[(v, m) for m in methods for v in values])
    wide.columns = [f"{m} {v}" for v, m in wide.columns]
    return wide.dropna(axis=1, how="all").reset_index()  # ce_next has no next token at the last position


def format_norm_scales(table: pd.DataFrame) -> str:
    """A ``norm_scales`` table as text: one line per site (and head), one column per token, then the skipped sites."""
    t = table[table.skipped.isna()]
    row = t.site + np.where(t["head"].isna(), "", " H" + t["head"].astype(str))
    wide = t.assign(row=row, col=[f"{int(p)}:{tok!r}" for p, tok in zip(t.pos, t.token)])
    wide = wide.pivot(index="row", columns="col", values="scale").reindex(index=list(dict.fromkeys(row)),
                                                                             columns=list(dict.fromkeys(wide.col)))
    wide.index.name = wide.columns.name = None
    lines = ["scale (what each norm divides by) per token", wide.to_string(float_format=lambda v: f"{v:.4g}")]
    lines += [f"{r.site}: skipped, {r.skipped}" for r in table[table.skipped.notna()].itertuples()]
    return "\n".join(lines)
