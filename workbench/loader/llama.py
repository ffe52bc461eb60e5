"""The Llama family — Llama (Llama 3's rope scaling included), SmolLM2 (a Llama), Qwen2, Mistral (sliding
windows) — as the workbench's GPT, and back (Llama and Qwen2).

Pre-RMSNorm (gain, no bias, no centering), SwiGLU MLP (gate_proj/up_proj/down_proj, SiLU), rotary
positions on the whole head (rotate-half layout), grouped-query attention, untied or tied unembedding.
Qwen2 adds biases to q/k/v (not o). Weights map one to one: q_proj [h·d_head, d] → W_Q [h, d, d_head],
o_proj [d, h·d_head] → W_O [h, d_head, d], gate_proj/up_proj/down_proj → W_gate/W_in/W_out (transposed).

Export writes a stock ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory. A norm-free model keeps the
family's RMSNorm modules but makes them identities: ``rms_norm_eps`` = 1e15 swamps mean(x²) in float32
(relative error mean(x²)/1e15) and the gain 1/rsqrt(1e15) cancels the division; reading such a directory
back (``workbench_ln_free`` in its config) folds them away again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import ROPE_SCALINGS, ModelConfig, check_rotary_scaling
from ..errors import WorkbenchError
from ..model import GPT
from .family import LN_FREE_EPS, Family, read_back_ln_free, stock_attention, stock_norm_weight, write_stock

# The working context of a rotary model: the window every analysis cuts text into (diagnose, confidence,
# studies). 256 keeps those analyses as fast and comparable as before; longer texts are one argument away
# (workbench.load(spec, n_ctx=N); the Language Ranker asks for its --max-tokens, default 1024).
N_CTX = 256


def rope_parameters(cfg: dict) -> tuple[float, float, dict]:
    """(θ, partial rotary factor, scaling) from a transformers 4 or 5 config; the scaling as
    ``ModelConfig.rotary_scaling`` ({} for plain rotary), which refuses the variants not implemented."""
    rp = cfg.get("rope_parameters") or {}
    old = cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type") or old.get("rope_type") or old.get("type") or "default"
    theta = rp.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    if kind == "default":
        return float(theta), float(partial), {}
    source = {**old, **rp}
    if kind == "llama3" and "original_max_position_embeddings" not in source:
        source["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings")
    if kind not in ROPE_SCALINGS:
        check_rotary_scaling({"rope_type": kind}, "rope")  # the one-line refusal
    return float(theta), float(partial), {"rope_type": kind, **{k: source.get(k) for k in ROPE_SCALINGS[kind]}}


def _config(cfg: dict, qwen: bool) -> dict:
    if qwen and cfg.get("use_sliding_window", False):
        raise WorkbenchError("Qwen2 with sliding-window attention is not supported (full causal attention only)")
    attn_bias = bool(cfg.get("attention_bias", False))
    return config_of(cfg, qkv_bias=True if qwen else attn_bias, o_bias=False if qwen else attn_bias,
                     mlp_bias=False if qwen else bool(cfg.get("mlp_bias", False)), family="qwen2" if qwen else "llama")


def config_of(cfg: dict, qkv_bias: bool, o_bias: bool, mlp_bias: bool, family: str) -> dict:
    """ModelConfig keywords of a Llama-layout config (shared by Qwen3); the biases as the family has them."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise WorkbenchError(f"hidden_act={act!r} is not supported in the Llama family (SwiGLU with silu)")
    theta, partial, scaling = rope_parameters(cfg)
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    d_head = cfg.get("head_dim") or d // h
    return dict(
        n_layers=cfg["num_hidden_layers"], d_model=d, n_heads=h, n_key_value_heads=cfg.get("num_key_value_heads") or h,
        d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
        n_ctx=min(cfg.get("max_position_embeddings", N_CTX), N_CTX), norm="pre-rms", eps=cfg.get("rms_norm_eps", 1e-6),
        mlp="swiglu", act_fn="silu", pos="rope", rotary_base=theta, rotary_dim=int(d_head * partial),
        rotary_scaling=scaling,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, unembed_bias=False, family=family,
    )


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    new = projections(sd, mc, cfg)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    new["ln_final.affine.w"] = sd["norm.weight"]
    for l in range(mc.n_layers):
        p, q = f"layers.{l}.", f"blocks.{l}."
        new[q + "ln1.affine.w"] = sd[p + "input_layernorm.weight"]
        new[q + "ln2.affine.w"] = sd[p + "post_attention_layernorm.weight"]
    return new


def projections(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    """Every weight of a Llama-layout checkpoint but its norms' (shared by OLMo-2, whose norms sit elsewhere):
    the embedding, the unembedding (tied or not), attention and MLP, with the biases ``mc`` says exist."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    h, kv, dh, d = mc.n_heads, mc.n_key_value_heads, mc.d_head, mc.d_model

    def heads_in(W: Tensor, n: int) -> Tensor:  # [n·d_head, d] → [n, d, d_head]
        return W.reshape(n, dh, d).permute(0, 2, 1)

    W_U = sd.get("lm_head.weight", sd["embed_tokens.weight"]) if not cfg.get("tie_word_embeddings", False) \
        else sd["embed_tokens.weight"]
    new = {"embed.W_E": sd["embed_tokens.weight"], "unembed.W_U": W_U.T}
    for l in range(mc.n_layers):
        p, q = f"layers.{l}.", f"blocks.{l}."
        a = p + "self_attn."
        new.update({
            q + "attn.W_Q": heads_in(sd[a + "q_proj.weight"], h), q + "attn.W_K": heads_in(sd[a + "k_proj.weight"], kv),
            q + "attn.W_V": heads_in(sd[a + "v_proj.weight"], kv),
            q + "attn.W_O": sd[a + "o_proj.weight"].T.reshape(h, dh, d),
            q + "mlp.W_gate": sd[p + "mlp.gate_proj.weight"].T, q + "mlp.W_in": sd[p + "mlp.up_proj.weight"].T,
            q + "mlp.W_out": sd[p + "mlp.down_proj.weight"].T,
        })
        if mc.qkv_bias:
            for x, n in (("q", h), ("k", kv), ("v", kv)):
                new[q + f"attn.b_{x.upper()}"] = sd[a + f"{x}_proj.bias"].reshape(n, dh)
        if mc.o_bias:
            new[q + "attn.b_O"] = sd[a + "o_proj.bias"]
        if mc.mlp_bias:
            new.update({q + "mlp.b_gate": sd[p + "mlp.gate_proj.bias"], q + "mlp.b_in": sd[p + "mlp.up_proj.bias"],
                        q + "mlp.b_out": sd[p + "mlp.down_proj.bias"]})
    return new


def _exportable(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is of its Llama-family shape: pre-rms or norm-free, SwiGLU, full unscaled rotary, full
    attention, the family's biases, and QK-norm exactly where the family has it (Qwen3: per head)."""
    qwen2, qwen3 = cfg.family == "qwen2", cfg.family == "qwen3"
    ln_free = cfg.scheme.stock == "identity"
    biases = ((True, False),) if qwen2 else ((False, False),) if qwen3 else ((False, False), (True, True))
    qk_ok = cfg.qk_norm is None if not qwen3 else (cfg.qk_norm == "head" or (ln_free and cfg.qk_norm is None))
    return (cfg.mlp == "swiglu" and cfg.act_fn == "silu" and cfg.pos == "rope" and cfg.rotary_dim == cfg.d_head
            and not cfg.parallel and not cfg.split_ln1_v and not cfg.split_ln2_up
            and cfg.scheme.stock in ("rmsnorm", "identity") and qk_ok and not cfg.rotary_scaling
            and stock_attention(cfg) and not cfg.unembed_bias and (cfg.qkv_bias, cfg.o_bias) in biases)


def export_tensors(model: GPT) -> dict[str, Tensor]:
    """The model's embedding, projections, MLP, unembedding and biases in the Llama layout's names (what
    Llama, Qwen2/3 and OLMo-2 share); each family adds its norms."""
    cfg = model.cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def heads_out(W: Tensor) -> Tensor:  # [n, d, d_head] → [n·d_head, d]
        return W.permute(0, 2, 1).reshape(-1, d)

    sd = {"model.embed_tokens.weight": model.W_E, "lm_head.weight": model.W_U.T}
    for l, b in enumerate(model.blocks):
        p, a = f"model.layers.{l}.", f"model.layers.{l}.self_attn."
        sd.update({a + "q_proj.weight": heads_out(b.attn.W_Q), a + "k_proj.weight": heads_out(b.attn.W_K),
                   a + "v_proj.weight": heads_out(b.attn.W_V), a + "o_proj.weight": b.attn.W_O.reshape(h * dh, d).T,
                   p + "mlp.gate_proj.weight": b.mlp.W_gate.T, p + "mlp.up_proj.weight": b.mlp.W_in.T,
                   p + "mlp.down_proj.weight": b.mlp.W_out.T})
        if cfg.qkv_bias:
            sd.update({a + "q_proj.bias": b.attn.b_Q.reshape(-1), a + "k_proj.bias": b.attn.b_K.reshape(-1),
                       a + "v_proj.bias": b.attn.b_V.reshape(-1)})
        if cfg.o_bias:
            sd[a + "o_proj.bias"] = b.attn.b_O
        if cfg.mlp_bias:
            sd.update({p + "mlp.gate_proj.bias": b.mlp.b_gate, p + "mlp.up_proj.bias": b.mlp.b_in,
                       p + "mlp.down_proj.bias": b.mlp.b_out})
    return sd


def common_config(cfg: ModelConfig, eps: float, bos: int | None) -> dict:
    """The configuration fields every Llama-layout family shares, for ``cfg`` with norm ε ``eps``."""
    return dict(vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_key_value_heads, head_dim=cfg.d_head, max_position_embeddings=cfg.n_ctx,
                rms_norm_eps=eps, rope_theta=cfg.rotary_base, tie_word_embeddings=False, bos_token_id=bos,
                eos_token_id=bos, hidden_act="silu")


def _stock_class(cfg: ModelConfig, common: dict):
    import transformers as tf

    if cfg.family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False), tf.Qwen2ForCausalLM
    if cfg.family == "qwen3":
        return tf.Qwen3Config(**common, attention_bias=False, use_sliding_window=False), tf.Qwen3ForCausalLM
    return tf.LlamaConfig(**common, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias), tf.LlamaForCausalLM


@torch.no_grad()
def export_llama(model: GPT, out: Path, check_tokens: Tensor | None = None) -> dict:
    """Write ``model`` as a stock Llama, Qwen2 or Qwen3 directory (its ``cfg.family``); returns
    ``{"max_abs_logit_diff", ...}``, the difference of the directory read back by transformers on
    ``check_tokens`` (``verify_export``)."""
    cfg = model.cfg
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3"}.get(cfg.family, "Llama")
    if not _exportable(cfg):
        raise WorkbenchError(f"this model is not of the {name} family's shape (pre-rms or norm-free, SwiGLU, full "
                             "unscaled rotary, full attention, its QK-norm and biases); it cannot be exported as one")
    ln_free = cfg.scheme.stock == "identity"
    eps = LN_FREE_EPS if ln_free else cfg.eps
    norm_weight = stock_norm_weight(ln_free, eps)
    sd = {**export_tensors(model), "model.norm.weight": norm_weight(model.ln_final, cfg.d_model)}
    for l, b in enumerate(model.blocks):
        p, a = f"model.layers.{l}.", f"model.layers.{l}.self_attn."
        sd.update({p + "input_layernorm.weight": norm_weight(b.ln1, cfg.d_model),
                   p + "post_attention_layernorm.weight": norm_weight(b.ln2, cfg.d_model)})
        if cfg.family == "qwen3":  # its per-head QK-norms; identities (a gain of √ε) once removed
            sd.update({a + "q_norm.weight": norm_weight(b.attn.q_norm, cfg.d_head),
                       a + "k_norm.weight": norm_weight(b.attn.k_norm, cfg.d_head)})
    tok = model.tokenizer
    bos = tok.token_to_id(cfg.bos_token) if tok is not None else None
    hf_cfg, cls = _stock_class(cfg, common_config(cfg, eps, bos))
    return write_stock(model, hf_cfg, cls, sd, out, check_tokens)


# Removal on these models: fine-tuning at 128-token windows with a small learning rate (pretrained models
# fine-tune at a fraction of their peak rate); the LN-free model is written as a stock directory.
REMOVAL_DEFAULTS = {"lr": 2e-5, "n_ctx": 128}

LLAMA = Family(name="llama", model_types=("llama",), config=lambda c: _config(c, qwen=False), weights=weights,
               export=export_llama, finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")
def _mistral_config(cfg: dict) -> dict:
    window = cfg.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise WorkbenchError(f"Mistral sliding_window={window!r} is not a positive number of tokens")
    return {**config_of(cfg, qkv_bias=False, o_bias=False, mlp_bias=False, family="mistral"), "sliding_window": window}


# Mistral: the Llama layout with sliding-window attention in every layer. No exporter (a stock Mistral
# directory back) yet, so its removal writes a workbench run.
MISTRAL = Family(name="mistral", model_types=("mistral",), config=_mistral_config, weights=weights,
                 removal_defaults=REMOVAL_DEFAULTS)
QWEN2 = Family(name="qwen2", model_types=("qwen2",), config=lambda c: _config(c, qwen=True), weights=weights,
               export=export_llama, finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")
