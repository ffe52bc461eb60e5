"""Direct logit attribution (DLA) with its error measured against each component's direct effect.

Dimensions: component, d_model. At one position the final residual is a sum of components
(embeddings, every head's result, every MLP's output, the output biases). DLA freezes the final
norm's statistics at the actual residual and reads each component through the frozen, now linear,
norm and the unembedding; the components' DLA then sum to the logit exactly. The *direct effect*
of a component is what removing it from the final residual does to the logit when the final norm
is recomputed. They agree exactly when the norm is linear (no norm, or batch statistics at
evaluation) and disagree where the norm's scale depends on every component at once (LayerNorm,
RMSNorm, DyT): ``nmae = mean|DLA − DE| / mean|DE|`` measures by how much.

Sandwich blocks (Peri-LN, Gemma, OLMo 2's reordered norm) add ``post_norm(sublayer)``: each head and neuron
is read through that post-norm frozen at its actual scale too, so the attributions still sum to the logit
exactly; once removal has frozen every norm, DLA equals the direct effect (NMAE ≈ 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import WorkbenchError
from ..model import GPT
from ..norms import Norm
from .positions import first_computed, hook_position


@dataclass
class DLAResult:
    logit: float  # the answer logit, or answer − contrast logit difference
    dla_sum: float
    nmae: float
    table: pd.DataFrame  # name, kind, layer, head, dla, direct_effect

    def to_json(self) -> dict:
        return {
            "logit": self.logit,
            "dla_sum": self.dla_sum,
            "nmae": self.nmae,
            "components": [
                {"name": r.name, "dla": float(r.dla), "direct_effect": float(r.direct_effect)}
                for r in self.table.itertuples()
            ],
        }


def require_residual_sum(model: GPT) -> None:
    if not model.cfg.scheme.components_through_frozen_norms(model.cfg.norm_context):
        raise WorkbenchError(
            f"direct logit attribution is undefined for norm {model.cfg.norm!r}: "
            f"{model.cfg.scheme.why_not_a_sum(model.cfg.norm_context)}, so it is not a sum of component outputs; "
            "use a Pre-norm, sandwich or norm-free model"
        )


def require_linear_readout(model: GPT) -> None:
    """Exact DLA reads each component through the frozen final norm and W_U: a soft-capped output
    (c·tanh(logit / c)) is not linear in the residual, so no component has its own share of the logit."""
    cap = model.cfg.output_logits_soft_cap
    if cap is not None:
        raise WorkbenchError(f"direct logit attribution is undefined with final logit soft-capping ({cap:g}·tanh(logit / "
                             f"{cap:g})): the logits are not linear in the final residual, so components do not sum to them")


def answer_direction(model: GPT, answer: str | int, contrast: str | int | None) -> tuple[Tensor, Tensor]:
    """Residual direction and unembedding bias of the answer logit (minus the contrast's)."""
    a = model.to_single_token(answer) if isinstance(answer, str) else int(answer)
    direction, bias = model.W_U[:, a], model.b_U[a]
    if contrast is not None:
        c = model.to_single_token(contrast) if isinstance(contrast, str) else int(contrast)
        direction, bias = direction - model.W_U[:, c], bias - model.b_U[c]
    return direction, bias


@torch.no_grad()
def residual_components(
    model: GPT, tokens: Tensor, pos: int = -1
) -> tuple[list[str], Float[Tensor, "component d_model"], Float[Tensor, "d_model"]]:
    """Names and vectors of the components whose sum is the final residual at ``pos``. In a sandwich
    block (``ln1_post``/``ln2_post``) every head, neuron and bias reaches the residual through the post-norm
    frozen at this position's actual scale — a linear map, so their images still sum exactly to what the
    block added; the norm's own constant (its bias β) is one more component, ``L{l}.ln1_post.offset``.
    ``pos`` is a token position: behind a sink prefix the hooks start at token 1, and position 0 is refused."""
    require_residual_sum(model)
    pos = hook_position(model, tokens.shape[-1], pos, "direct logit attribution")
    names_filter = lambda n: n in ("hook_embed", "hook_pos_embed") or n.endswith(  # noqa: E731
        ("attn.hook_z", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"))
    _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    names, vecs = ["embed"], [cache["hook_embed"][0, pos]]
    if "hook_pos_embed" in cache.cache_dict:  # learned positions; rotary ones live inside attention
        names.append("pos_embed")
        vecs.append(cache["hook_pos_embed"][0, pos])
    for l, block in enumerate(model.blocks):
        z = cache[f"blocks.{l}.attn.hook_z"][0, pos]  # [head, d_head]
        heads = torch.einsum("hd,hdm->hm", z, block.attn.W_O)
        attn = [(f"L{l}H{h}", heads[h]) for h in range(model.cfg.n_heads)] + [(f"L{l}.attn.b_O", block.attn.b_O)]
        if block.placement == "peri":
            mlp_raw = cache[f"blocks.{l}.mlp.hook_post"][0, pos] @ block.mlp.W_out
        else:
            mlp_raw = cache[f"blocks.{l}.hook_mlp_out"][0, pos] - block.mlp.b_out
        mlp = [(f"L{l}.mlp", mlp_raw), (f"L{l}.mlp.b_out", block.mlp.b_out)]
        for site, parts in (("ln1_post", attn), ("ln2_post", mlp)):
            if block.placement == "peri":
                parts = through_frozen_norm(getattr(block, site), parts, f"L{l}.{site}")
            names += [n for n, _ in parts]
            vecs += [v for _, v in parts]
    stack = torch.stack(vecs)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, pos]
    return names, stack, final


def through_frozen_norm(norm: Norm, parts: list[tuple[str, Tensor]], name: str) -> list[tuple[str, Tensor]]:
    """The images of ``parts`` (whose sum is the norm's input) under the norm frozen at that input, and
    the norm's constant as ``{name}.offset``: they sum to the norm's output."""
    linear, gain, offset = frozen_norm_parts(norm, torch.stack([v for _, v in parts]).sum(0))
    # a frozen σ broadcasts as [1, 1, 1]: keep every image a d_model vector
    return [(n, (linear(v) * gain).reshape(v.shape)) for n, v in parts] + \
        [(f"{name}.offset", (offset * torch.ones_like(gain)).reshape(gain.shape))]


def frozen_norm_parts(norm: Norm, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor | float]:
    """norm(x) = linear(x) ⊙ gain + offset with the norm's statistics frozen at ``x`` (the cached scale)."""
    try:
        linear, const = norm.standardize.frozen(x)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    affine = norm.affine
    w = getattr(affine, "w", None)
    b = getattr(affine, "b", None)
    gain = (w if w is not None else torch.ones_like(x)) * norm.depth_scale
    offset = (const * gain) + (b * norm.depth_scale if b is not None else 0.0)
    return linear, gain, offset


@torch.no_grad()
def direct_logit_attribution(
    model: GPT, prompt: str | Tensor, answer: str | int, contrast: str | int | None = None, pos: int = -1
) -> DLAResult:
    """Per-component DLA and direct effect of the answer logit (or answer − contrast) at ``pos``."""
    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else prompt
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.shape[0] != 1:
        raise WorkbenchError("direct logit attribution takes one prompt at a time")
    model.eval()
    require_residual_sum(model)
    require_linear_readout(model)
    direction, u_bias = answer_direction(model, answer, contrast)
    names, comps, final = residual_components(model, tokens, pos)
    if not (torch.isfinite(final).all() and torch.isfinite(comps).all()):
        bad = (~torch.isfinite(comps).all(-1)).tolist()
        first = next((n for n, b in zip(names, bad) if b), "the final residual")
        raise WorkbenchError(f"the residual stream overflows on this prompt (non-finite from {first}); DLA needs "
                             "finite activations — try another prompt, or a model whose norms were not removed")
    if not torch.allclose(comps.sum(0), final, atol=1e-4 * max(1.0, final.abs().max().item())):
        raise RuntimeError("components do not sum to the final residual; the decomposition is incomplete")
    linear, gain, offset = frozen_norm_parts(model.ln_final, final)
    read = gain * direction  # how a unit of normalized residual moves the logit
    dla = torch.stack([(linear(c) * read).sum() for c in comps])

    def logit_of(resid: Tensor) -> Tensor:
        return (model.ln_final(resid.reshape(1, 1, -1)).reshape(-1) * direction).sum(-1) + u_bias

    logit = logit_of(final)
    direct = torch.stack([logit - logit_of(final - c) for c in comps])
    const_names = ["ln_final.offset", "unembed.b_U"]
    const_vals = torch.stack([(offset * direction).sum() if torch.is_tensor(offset) else torch.tensor(0.0), u_bias])
    # Constants are not in the residual stream: their direct effect is their attribution by definition.
    nmae = ((dla - direct).abs().mean() / direct.abs().mean().clamp_min(1e-30)).item()
    rows = [_row(n, d, e) for n, d, e in zip(names, dla.tolist(), direct.tolist())]
    rows += [_row(n, v, v, kind="constant") for n, v in zip(const_names, const_vals.tolist())]
    table = pd.DataFrame(rows)
    return DLAResult(logit=logit.item(), dla_sum=float(dla.sum() + const_vals.sum()), nmae=nmae, table=table)


def dla_exactness(model: GPT, windows: Float[Tensor, "window pos"] | Tensor,
                  positions: list[int] | None = None) -> pd.DataFrame:
    """DLA's error position by position on text: for each window and token position ``p`` (default: every
    position the model computes, but the last), the NMAE of DLA against the direct effect on the logit of the
    token that follows ``p``. One row per (window, position): the logit, the DLA sum, the NMAE; ``finite``
    False (and NaN) where the window's residual stream overflows there. A norm-free model's claim to exact
    DLA is this table's maximum (docs/ln_removal.md: ≤ 1e-5 at positions ≥ 1)."""
    n = windows.shape[-1]
    positions = list(range(first_computed(model), n - 1)) if positions is None else positions
    rows = []
    for w, window in enumerate(windows):
        for p in positions:
            if not 0 <= p < n - 1:
                raise WorkbenchError(f"position {p} has no next token in a {n}-token window; pick 0 … {n - 2}")
            nxt = int(window[p + 1])
            try:
                r = direct_logit_attribution(model, window[: p + 1], nxt, pos=p)
                rows.append({"window": w, "pos": p, "token": nxt, "logit": r.logit, "dla_sum": r.dla_sum,
                             "nmae": r.nmae, "finite": True})
            except WorkbenchError as e:
                if "overflows" not in str(e):
                    raise
                rows.append({"window": w, "pos": p, "token": nxt, "logit": float("nan"), "dla_sum": float("nan"),
                             "nmae": float("nan"), "finite": False})
    return pd.DataFrame(rows)


@torch.no_grad()
def top_tokens(model: GPT, prompt: str, k: int = 5) -> list[str]:
    """The model's ``k`` most likely next tokens after ``prompt``, most likely first."""
    logits = model(model.to_tokens(prompt))[0, -1]
    return [model.tokenizer.decode([int(i)]) for i in logits.topk(k).indices]


def _row(name: str, dla: float, de: float, kind: str | None = None) -> dict:
    layer, head = None, None
    if name.startswith("L"):
        layer = int(name[1:].split("H")[0].split(".")[0])
        if "H" in name and "." not in name:
            head = int(name.split("H")[1])
    if kind is None:
        kind = ("head" if head is not None else "bias" if name.endswith(("b_O", "b_out")) else
                "norm offset" if name.endswith(".offset") else
                "mlp" if name.endswith(".mlp") else "embedding")
    return {"name": name, "kind": kind, "layer": layer, "head": head, "dla": dla, "direct_effect": de}


def format_dla(result: DLAResult, top: int = 20) -> str:
    t = result.table.reindex(result.table.dla.abs().sort_values(ascending=False).index).head(top)
    lines = [f"logit {result.logit:+.4f}   sum of DLA {result.dla_sum:+.4f}   NMAE(DLA vs direct effect) {result.nmae:.3g}",
             f"{'component':<16}{'DLA':>10}{'direct':>10}"]
    lines += [f"{r.name:<16}{r.dla:>+10.4f}{r.direct_effect:>+10.4f}" for r in t.itertuples()]
    return "\n".join(lines)
