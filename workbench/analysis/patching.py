"""Activation patching and attribution patching on a clean/corrupted prompt pair.

The metric is the logit difference answer − contrast at the last position. Activation patching runs
the corrupted prompt with one activation replaced by its clean value and records the metric;
attribution patching estimates the same change to first order, grad(metric) · (clean − corrupted),
from one forward and one backward pass of the corrupted prompt. Units: the residual stream at each
(layer, position), each attention head (hook_z, all positions) and each MLP (hook_mlp_out, all
positions). Patching needs no linear residual stream, so it works on every normalization.

Positions are token positions. Behind an attention-sink prefix (``model/sink.py``) the hooks see positions
1, 2, … only; position 0 holds the sink token in both prompts and is a constant of the weights, so patching
it changes nothing: its rows are exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..model import GPT
from .dla import answer_direction
from .positions import first_computed, require_computed


@dataclass
class PatchingResult:
    clean_metric: float
    corrupt_metric: float
    correlation: float  # Pearson, attribution vs activation patching, over every unit
    table: pd.DataFrame  # kind, layer, pos, head, activation, attribution, normalized

    def to_json(self) -> dict:
        corr = self.table.groupby("kind")[["activation", "attribution"]].apply(_pearson)
        return {"clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                "correlation": self.correlation, "correlation_by_kind": {k: float(v) for k, v in corr.items()},
                "units": self.table.replace({np.nan: None}).to_dict(orient="records")}


def _pearson(df: pd.DataFrame) -> float:
    a, b = df["activation"].to_numpy(), df["attribution"].to_numpy()
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _pair(model: GPT, clean: str | Tensor, corrupt: str | Tensor) -> tuple[Tensor, Tensor]:
    c = model.to_tokens(clean) if isinstance(clean, str) else clean
    k = model.to_tokens(corrupt) if isinstance(corrupt, str) else corrupt
    if c.shape != k.shape:
        raise WorkbenchError(
            f"clean and corrupted prompts must have the same number of tokens ({c.shape[-1]} vs {k.shape[-1]}); "
            "change words one-for-one so the positions line up"
        )
    require_computed(model, c.shape[-1], 1, "patching")
    return c, k


def _units(model: GPT) -> list[str]:
    return [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers)
            for h in ("hook_resid_pre", "attn.hook_z", "hook_mlp_out")]


def patching(
    model: GPT, clean: str | Tensor, corrupt: str | Tensor, answer: str | int, contrast: str | int
) -> PatchingResult:
    model.eval()
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    direction, bias = answer_direction(model, answer, contrast)
    a = model.to_single_token(answer) if isinstance(answer, str) else int(answer)
    b = model.to_single_token(contrast) if isinstance(contrast, str) else int(contrast)

    def metric(logits: Tensor) -> Tensor:
        return logits[0, -1, a] - logits[0, -1, b]

    names = set(_units(model))
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in names)
        clean_m = metric(clean_logits).item()
    corrupt_m, grads, acts = _corrupt_with_grads(model, corrupt_tokens, names, metric)

    rows = []
    with torch.no_grad():
        for l in range(model.cfg.n_layers):
            key = f"blocks.{l}.hook_resid_pre"
            rows += _resid_rows(model, corrupt_tokens, l, clean_cache[key], acts[key], grads[key], metric, corrupt_m)
            key = f"blocks.{l}.attn.hook_z"
            delta = clean_cache[key] - acts[key]
            attr = (grads[key] * delta).sum((0, 1, 3))
            for h in range(model.cfg.n_heads):
                m = _patched(model, corrupt_tokens, key, clean_cache[key], metric, head=h)
                rows.append(dict(kind="head", layer=l, pos=None, head=h, activation=m - corrupt_m,
                                 attribution=attr[h].item()))
            key = f"blocks.{l}.hook_mlp_out"
            delta = clean_cache[key] - acts[key]
            m = _patched(model, corrupt_tokens, key, clean_cache[key], metric)
            rows.append(dict(kind="mlp", layer=l, pos=None, head=None, activation=m - corrupt_m,
                             attribution=(grads[key] * delta).sum().item()))
    table = pd.DataFrame(rows)
    gap = clean_m - corrupt_m
    table["normalized"] = table["activation"] / gap if abs(gap) > 1e-9 else np.nan
    return PatchingResult(clean_m, corrupt_m, _pearson(table), table)


def _resid_rows(model, tokens, layer, clean, corrupt, grad, metric, corrupt_m) -> list[dict]:
    """One row per token position of the residual before ``layer``; the hooks' index is the position less
    the first one the model computes (1 behind a sink prefix, whose position 0 no patch can move)."""
    first = first_computed(model)
    attr = (grad * (clean - corrupt)).sum(-1)[0]
    rows = [dict(kind="resid", layer=layer, pos=p, head=None, activation=0.0, attribution=0.0) for p in range(first)]
    for p in range(first, tokens.shape[-1]):
        m = _patched(model, tokens, f"blocks.{layer}.hook_resid_pre", clean, metric, pos=p - first)
        rows.append(dict(kind="resid", layer=layer, pos=p, head=None, activation=m - corrupt_m,
                         attribution=attr[p - first].item()))
    return rows


def _corrupt_with_grads(model, tokens, names, metric):
    acts: dict[str, Tensor] = {}

    def keep(t, hook):
        t.retain_grad()
        acts[hook.name] = t

    with torch.enable_grad(), model.hooks(fwd_hooks=[(lambda n: n in names, keep)]):
        m = metric(model(tokens))
        model.zero_grad(set_to_none=True)
        m.backward()
    grads = {k: v.grad.detach() for k, v in acts.items()}
    model.zero_grad(set_to_none=True)
    return m.item(), grads, {k: v.detach() for k, v in acts.items()}


@torch.no_grad()
def _patched(model, tokens, key, clean_value, metric, pos=None, head=None) -> float:
    def patch(t, hook):
        t = t.clone()
        if pos is not None:
            t[:, pos] = clean_value[:, pos]
        elif head is not None:
            t[:, :, head] = clean_value[:, :, head]
        else:
            t = clean_value.clone()
        return t

    with model.hooks(fwd_hooks=[(key, patch)]):
        return metric(model(tokens)).item()


def format_patching(r: PatchingResult, top: int = 12) -> str:
    t = r.table.reindex(r.table.activation.abs().sort_values(ascending=False).index).head(top)
    lines = [f"metric clean {r.clean_metric:+.4f}  corrupted {r.corrupt_metric:+.4f}   "
             f"Pearson(attribution, activation patching) = {r.correlation:.4f}",
             f"{'unit':<14}{'activation':>12}{'attribution':>13}"]
    for u in t.itertuples():
        name = (f"resid L{u.layer} p{int(u.pos)}" if u.kind == "resid" else
                f"head L{u.layer}H{int(u.head)}" if u.kind == "head" else f"mlp L{u.layer}")
        lines.append(f"{name:<14}{u.activation:>+12.4f}{u.attribution:>+13.4f}")
    return "\n".join(lines)
