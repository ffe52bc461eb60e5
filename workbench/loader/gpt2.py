"""GPT-2 checkpoints ↔ the workbench's GPT family, both ways, exactly.

Loading: a Hugging Face GPT-2 checkpoint (``config.json`` with ``model_type: gpt2``) becomes a Pre-LN
``GPT`` whose logits equal ``GPT2LMHeadModel``'s.

Exporting: a ``GPT`` (Pre-LN, or LN-free) becomes a directory stock ``transformers`` loads as a
``GPT2LMHeadModel`` without custom code. An LN-free model keeps GPT-2's LayerNorm modules but makes
them exact identities on its residual stream: ``layer_norm_epsilon`` = 1e15 swamps the variance in
float32 (var + ε rounds to ε for any var below ~6e7), the gain 1/rsqrt(ε) cancels the division, and
the centering is a no-op because every reader of a centered-LN-derived model is mean-centered.
GPT-2 has no unembedding bias, so the final norm's bias (and ours) rides on a constant: ln_f adds
1/d to every coordinate, and the lm_head rows carry C·W_U + 1 ⊗ b — exact, since the centered
residual sums to zero. Reading such a directory back gives the LN-free ``GPT`` again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from ..model import GPT
from ..norms import Affine
from ..tokenizer import EOT
from .family import LN_FREE_EPS, MARKER, Family, read_back_ln_free, stock_attention, verify_export

def config(cfg: dict) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    problems = []
    if act != "gelu_new":
        problems.append(f"activation_function={act!r} (the workbench's GPT-2 uses gelu_new)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("non-standard attention scaling")
    if cfg.get("add_cross_attention", False):
        problems.append("cross-attention")
    if problems:
        raise WorkbenchError(f"this GPT-2 checkpoint is not supported: {'; '.join(problems)}")
    n_embd = cfg.get("n_embd", 768)
    return dict(n_layers=cfg.get("n_layer", 12), d_model=n_embd, n_heads=cfg.get("n_head", 12),
                d_vocab=cfg.get("vocab_size", 50257), n_ctx=cfg.get("n_positions", 1024), norm="pre-ln",
                d_mlp=cfg.get("n_inner") or 4 * n_embd, eps=cfg.get("layer_norm_epsilon", 1e-5), act_fn="gelu_new",
                family="gpt2")


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    h, dh = mc.n_heads, mc.d_head

    def heads_in(W: Tensor) -> Tensor:  # [d_model, h*dh] → [h, d_model, dh]
        return W.reshape(W.shape[0], h, dh).permute(1, 0, 2)

    new = {"embed.W_E": sd["wte.weight"], "pos_embed.W_pos": sd["wpe.weight"],
           "ln_final.affine.w": sd["ln_f.weight"], "ln_final.affine.b": sd["ln_f.bias"]}
    W_U = sd.get("lm_head.weight", sd["wte.weight"]) if not cfg.get("tie_word_embeddings", True) else sd["wte.weight"]
    new["unembed.W_U"] = W_U.T
    new["unembed.b_U"] = torch.zeros(mc.d_vocab)
    for layer in range(mc.n_layers):
        p, q = f"h.{layer}.", f"blocks.{layer}."
        Wq, Wk, Wv = sd[p + "attn.c_attn.weight"].chunk(3, dim=1)
        bq, bk, bv = sd[p + "attn.c_attn.bias"].chunk(3)
        new.update({
            q + "ln1.affine.w": sd[p + "ln_1.weight"], q + "ln1.affine.b": sd[p + "ln_1.bias"],
            q + "ln2.affine.w": sd[p + "ln_2.weight"], q + "ln2.affine.b": sd[p + "ln_2.bias"],
            q + "attn.W_Q": heads_in(Wq), q + "attn.W_K": heads_in(Wk), q + "attn.W_V": heads_in(Wv),
            q + "attn.b_Q": bq.reshape(h, dh), q + "attn.b_K": bk.reshape(h, dh), q + "attn.b_V": bv.reshape(h, dh),
            q + "attn.W_O": sd[p + "attn.c_proj.weight"].reshape(h, dh, mc.d_model), q + "attn.b_O": sd[p + "attn.c_proj.bias"],
            q + "mlp.W_in": sd[p + "mlp.c_fc.weight"], q + "mlp.b_in": sd[p + "mlp.c_fc.bias"],
            q + "mlp.W_out": sd[p + "mlp.c_proj.weight"], q + "mlp.b_out": sd[p + "mlp.c_proj.bias"],
        })
    return new


def _readers_centered(model: GPT) -> float:
    """Largest |column sum over d_model| of any residual reader, relative to the matrix's scale."""
    worst = 0.0
    for W in [m for b in model.blocks for m in (b.attn.W_Q, b.attn.W_K, b.attn.W_V)]:
        worst = max(worst, (W.sum(1).abs().max() / W.abs().max().clamp_min(1e-30)).item())
    for W in [b.mlp.W_in for b in model.blocks] + [model.W_U]:
        worst = max(worst, (W.sum(0).abs().max() / W.abs().max().clamp_min(1e-30)).item())
    return worst


@torch.no_grad()
def export_gpt2(model: GPT, out: str | Path, check_tokens: Tensor | None = None) -> dict:
    """Write ``model`` as a stock ``GPT2LMHeadModel`` directory; returns ``{"max_abs_logit_diff", ...}``, the
    difference of the directory read back by transformers on ``check_tokens`` (``verify_export``)."""
    from ..io import atomic_dir, check_out_dir

    out = Path(out)
    check_out_dir(out)
    ln_free = _check_exportable(model)
    eps = LN_FREE_EPS if ln_free else model.cfg.eps
    gain = 1.0 / torch.rsqrt(torch.tensor(eps, dtype=torch.float32)).item() if ln_free else 1.0
    sd = _gpt2_state_dict(model, ln_free, gain)
    hf = _gpt2_model(model, sd, eps, ln_free)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save(str(tmp / "tokenizer.json"))
        diff = verify_export(model, tmp, check_tokens)
    return {"max_abs_logit_diff": diff, "ln_free": ln_free, "layer_norm_epsilon": eps}


def _check_exportable(model: GPT) -> bool:
    """Refuse a model GPT-2 cannot express exactly; True when it is LN-free (its norms become identities)."""
    cfg = model.cfg
    ln_free = cfg.scheme.stock == "identity"
    if cfg.scheme.stock not in ("layernorm", "identity") or cfg.split_ln1_v or cfg.qk_norm is not None:
        raise WorkbenchError(f"only pre-ln and LN-free (none) models export to GPT-2, not {cfg.norm!r}; "
                             "use `workbench convert --to folded` or `remove-ln` first")
    if not stock_attention(cfg):
        raise WorkbenchError("GPT-2 attends to every earlier key with logits scaled by 1/√d_head and caps nothing; "
                             "this model has a sliding window, another attention scale or soft-caps")
    if (cfg.d_head * cfg.n_heads != cfg.d_model or cfg.act_fn != "gelu_new" or cfg.mlp != "gelu" or cfg.pos != "learned"
            or cfg.parallel or cfg.n_key_value_heads != cfg.n_heads):
        raise WorkbenchError("GPT-2 needs d_head·n_heads = d_model, a gelu_new MLP, learned positions, sequential "
                             "blocks and one K/V head per head; this model has another architecture")
    if ln_free and _readers_centered(model) > 1e-4:
        raise WorkbenchError("this LN-free model's readers are not mean-centered (it did not come from a centered "
                             "LayerNorm), so GPT-2's LayerNorm cannot be made an identity on it; it cannot be exported")
    return ln_free


def _ln_params(norm, d: int, ln_free: bool, gain: float) -> tuple[Tensor, Tensor]:
    """GPT-2 LayerNorm (weight, bias) for one of our norms: the constant gain of an identity when LN-free."""
    if ln_free:
        return torch.full((d,), gain), torch.zeros(d)
    a = norm.affine
    w = a.w if isinstance(a, Affine) else torch.ones(d)
    b = a.b if isinstance(a, Affine) and a.b is not None else torch.zeros(d)
    return w * gain, b


def _gpt2_state_dict(model: GPT, ln_free: bool, gain: float) -> dict[str, Tensor]:
    """``model``'s weights under GPT2LMHeadModel's names and layouts, final norm folded into ``lm_head``."""
    cfg = model.cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def heads_out(W: Tensor) -> Tensor:  # [h, d_model, dh] → [d_model, h*dh]
        return W.permute(1, 0, 2).reshape(d, h * dh)

    sd = {"transformer.wte.weight": model.W_E, "transformer.wpe.weight": model.W_pos}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        a = b.attn
        (w1, b1), (w2, b2) = _ln_params(b.ln1, d, ln_free, gain), _ln_params(b.ln2, d, ln_free, gain)
        sd.update({
            p + "ln_1.weight": w1, p + "ln_1.bias": b1, p + "ln_2.weight": w2, p + "ln_2.bias": b2,
            p + "attn.c_attn.weight": torch.cat([heads_out(a.W_Q), heads_out(a.W_K), heads_out(a.W_V)], 1),
            p + "attn.c_attn.bias": torch.cat([a.b_Q.reshape(-1), a.b_K.reshape(-1), a.b_V.reshape(-1)]),
            p + "attn.c_proj.weight": a.W_O.reshape(h * dh, d), p + "attn.c_proj.bias": a.b_O,
            p + "mlp.c_fc.weight": b.mlp.W_in, p + "mlp.c_fc.bias": b.mlp.b_in,
            p + "mlp.c_proj.weight": b.mlp.W_out, p + "mlp.c_proj.bias": b.mlp.b_out,
        })
    # Final norm + unembedding: logits = (x̂ ⊙ w + b) W_U + b_U with x̂ summing to zero, rewritten as
    # (x̂ + 1/d) W' with W' = C·diag(w)·W_U + 1 ⊗ (b W_U + b_U).
    if ln_free:
        M, b_total = model.W_U.double(), model.b_U.double()
    else:
        wf, bf = _ln_params(model.ln_final, d, ln_free, gain)
        M, b_total = wf.double()[:, None] * model.W_U.double(), bf.double() @ model.W_U.double() + model.b_U.double()
    W_lm = M - M.mean(0, keepdim=True) + b_total[None, :]
    sd["transformer.ln_f.weight"] = torch.full((d,), gain)
    sd["transformer.ln_f.bias"] = torch.full((d,), 1.0 / d)
    sd["lm_head.weight"] = W_lm.T.float()
    return sd


def _gpt2_model(model: GPT, sd: dict[str, Tensor], eps: float, ln_free: bool):
    """The GPT2LMHeadModel (its config marked when LN-free) holding ``sd``; a missing or extra weight is a bug."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    eot = model.tokenizer.token_to_id(EOT) if model.tokenizer is not None else None
    hf_cfg = GPT2Config(vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="gelu_new", layer_norm_epsilon=eps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                        bos_token_id=eot, eos_token_id=eot)
    if ln_free:
        setattr(hf_cfg, MARKER, True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()}, strict=False)
    # attn.bias and masked_bias are causal-mask buffers GPT2Attention builds itself, not weights.
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
    return hf


GPT2 = Family(name="gpt2", model_types=("gpt2",), config=config, weights=weights, export=export_gpt2,
              finish=read_back_ln_free)
