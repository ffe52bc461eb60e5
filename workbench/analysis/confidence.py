"""Confidence ("entropy") neurons: last-layer MLP neurons that write into the unembedding's null space.

Such a neuron barely moves any logit directly; what it changes is the norm of the final residual, and
through the final norm's scale the temperature of every logit at once (Stolfo et al. 2024 found them in
GPT-2; Baroni et al. 2025 found them inactive once LayerNorm is removed). We find candidates by
weight geometry — output-weight norm and the fraction of it in the effective null space of W_U (the
left singular directions with the smallest singular values) — and measure their effect on the
prediction entropy when mean-ablated, once with the final norm live and once with its scale frozen
at the clean value. The share that goes through the scale is 1 − frozen / total.

Behind an attention-sink prefix (``model/sink.py``) position 0 is the stored prefix: it is neither in the
mean activation nor ablated, and its entropy (of the stored logits) is the same in every run.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..model import GPT


def null_space_basis(model: GPT, fraction: float = 0.1) -> Float[Tensor, "d_model k"]:
    """Left singular vectors of W_U with the smallest singular values (k = fraction · d_model)."""
    U, S, _ = torch.linalg.svd(model.W_U.detach(), full_matrices=False)
    k = max(1, round(fraction * model.cfg.d_model))
    return U[:, -k:]


@torch.no_grad()
def neuron_geometry(model: GPT, layer: int = -1, null_fraction: float = 0.1) -> pd.DataFrame:
    """Per neuron of one MLP layer: output-weight norm, share of it in W_U's effective null space."""
    W_out = model.blocks[layer].mlp.W_out.detach()  # [d_mlp, d_model]
    basis = null_space_basis(model, null_fraction)
    norm = W_out.norm(dim=-1)
    null_share = (W_out @ basis).pow(2).sum(-1) / norm.pow(2).clamp_min(1e-30)
    return pd.DataFrame({"neuron": range(W_out.shape[0]), "w_out_norm": norm.tolist(),
                         "null_share": null_share.tolist(), "score": (norm * null_share).tolist()})


def _entropy(logits: Tensor) -> Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


@torch.no_grad()
def confidence_neurons(
    model: GPT, tokens: Tensor, top: int = 5, null_fraction: float = 0.1, layer: int = -1
) -> pd.DataFrame:
    """Mean-ablation effects of the ``top`` candidates (by norm × null share) and, for contrast, of
    the ``top`` neurons with the largest output norm overall."""
    model.eval()
    n_layer = layer % model.cfg.n_layers
    geo = neuron_geometry(model, n_layer, null_fraction)
    candidates = geo.nlargest(top, "score").assign(group="null-space candidate")
    baseline = geo[~geo.neuron.isin(candidates.neuron)].nlargest(top, "w_out_norm").assign(group="largest norm")
    post_name, scale_name = f"blocks.{n_layer}.mlp.hook_post", "ln_final.hook_scale"
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (post_name, scale_name))
    clean_entropy = _entropy(logits)
    clean_scale = cache[scale_name]
    mean_act = cache[post_name].mean((0, 1))
    rows = []
    for r in pd.concat([candidates, baseline]).itertuples():
        def ablate(t, hook, n=r.neuron):
            t = t.clone()
            t[..., n] = mean_act[n]
            return t

        with model.hooks(fwd_hooks=[(post_name, ablate)]):
            total = (_entropy(model(tokens)) - clean_entropy).item()
        with model.hooks(fwd_hooks=[(post_name, ablate), (scale_name, lambda t, hook: clean_scale)]):
            frozen = (_entropy(model(tokens)) - clean_entropy).item()
        via_scale = 1 - frozen / total if abs(total) > 1e-4 else float("nan")  # ratio of noise otherwise
        rows.append({"group": r.group, "neuron": r.neuron, "w_out_norm": r.w_out_norm, "null_share": r.null_share,
                     "mean_activation": mean_act[r.neuron].item(), "entropy_effect": total,
                     "entropy_effect_frozen_scale": frozen, "share_via_norm_scale": via_scale})
    return pd.DataFrame(rows)


def validation_tokens(model: GPT, corpus: str = "english", sequences: int = 16) -> Tensor:
    """``sequences`` context-length windows spread over the corpus' validation works (model's tokenizer)."""
    from .depth import corpus_batches

    return corpus_batches(model, corpus, sequences * model.cfg.n_ctx, batch_size=sequences)[0]


def summarize(df: pd.DataFrame) -> dict:
    """Per group: how much of the entropy effect goes through the norm scale, pooled over neurons
    (Σ|total − frozen| / Σ|total|, robust where single neurons have near-zero effects)."""
    out = {}
    for group, g in df.groupby("group"):
        total = g.entropy_effect.abs().sum()
        out[group] = {
            "mean_abs_entropy_effect": float(g.entropy_effect.abs().mean()),
            "share_via_norm_scale": float((g.entropy_effect - g.entropy_effect_frozen_scale).abs().sum() / total)
            if total > 0 else float("nan"),
            "mean_null_share": float(g.null_share.mean()),
        }
    return out
