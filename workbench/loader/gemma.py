"""Gemma 2 and Gemma 3 (text) as the workbench's GPT: the Llama family's projections and rotary layout
(``llama.py``) with Gemma's differences as config data and load-time weight transforms.

* Sandwich norms (``peri-rms``): input_layernorm → ``ln1``, post_attention_layernorm (on the attention's
  *output*) → ``ln1_post``, pre_feedforward_layernorm → ``ln2``, post_feedforward_layernorm → ``ln2_post``.
* Gemma's RMSNorm multiplies by (1 + w): the gain is stored as the ``Affine`` gain 1 + w (float32, as
  transformers computes it), so every norm is the workbench's ordinary RMSNorm.
* The embedding is multiplied by √d_model: ``W_E`` holds the scaled table, what enters the residual
  stream; the tied unembedding ``W_U`` is the unscaled one.
* GeGLU (gelu_pytorch_tanh = torch's tanh GELU, the workbench's ``gelu_new``) in the gated MLP.
* Attention logits divided by √query_pre_attn_scalar (``attn_scale``), soft-capped (Gemma 2:
  ``attn_scores_soft_cap``), final logits soft-capped (``output_logits_soft_cap``); sliding windows on the
  layers ``layer_types`` names (``sliding_layers``).
* Gemma 3 adds per-head QK-norm (``qk_norm="head"``, (1 + w) gains too) and its sliding layers' own
  unscaled rotary base (``sliding_rotary_base``).

The exporter writes a stock ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` directory back (``export_gemma``),
so ``remove-ln`` ends in one, every norm an identity. ``convert`` refuses the live post-norms and QK-norms,
DLA Gemma 2's capped logits (not linear in the residual). Loaded in float32 like every family: cast to bfloat16, the gains 1 + w round to
bf16 where transformers keeps them in float32 — close to its bf16 model, not bit-equal.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from ..model import GPT
from .family import LN_FREE_EPS, Family, read_back_ln_free, stock_norm_weight, write_stock
from .llama import N_CTX, REMOVAL_DEFAULTS, export_tensors, rope_parameters, weights as llama_weights

# transformers' activation names → the workbench's (gelu_pytorch_tanh is F.gelu(approximate="tanh")).
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _sliding_layers(cfg: dict, name: str, pattern: int) -> list[int]:
    """The layers that attend through the window: ``layer_types``, else transformers' default pattern
    (every ``pattern``-th layer full, the others sliding)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                       for i in range(n)]
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown or len(types) != n:
        raise WorkbenchError(f"{name} layer_types {unknown or types} are not supported (one of {', '.join(_LAYER_TYPES)} "
                             "per layer)")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not (isinstance(cfg.get("sliding_window"), int) and cfg["sliding_window"] >= 1):
        raise WorkbenchError(f"{name} has sliding-attention layers but sliding_window={cfg.get('sliding_window')!r}")
    return sliding


def _common(cfg: dict, name: str, pattern: int) -> dict:
    """ModelConfig keywords shared by Gemma 2 and 3; the rotary bases and soft-caps are set by each."""
    if cfg.get("use_bidirectional_attention"):
        raise WorkbenchError(f"{name} with use_bidirectional_attention is not supported (causal attention only)")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"  # transformers' Gemma MLP reads only this key
    if act not in _ACTIVATIONS:
        raise WorkbenchError(f"{name} hidden_activation={act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    d_head = cfg.get("head_dim") or d // h
    sliding = _sliding_layers(cfg, name, pattern)
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        n_layers=cfg["num_hidden_layers"], d_model=d, n_heads=h, n_key_value_heads=cfg.get("num_key_value_heads") or h,
        d_head=d_head, d_mlp=cfg["intermediate_size"], d_vocab=cfg["vocab_size"],
        n_ctx=min(cfg.get("max_position_embeddings", N_CTX), N_CTX), norm="peri-rms", eps=cfg.get("rms_norm_eps", 1e-6),
        mlp="swiglu", act_fn=_ACTIVATIONS[act], pos="rope", rotary_dim=d_head,
        sliding_window=cfg.get("sliding_window") if sliding else None, sliding_layers=sliding or None,
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** 0.5,
        qkv_bias=bias, o_bias=bias, mlp_bias=False, unembed_bias=False,
    )


def _rope(source: dict, name: str) -> tuple[float, dict]:
    """(θ, scaling) of a config's rope parameters (``llama.rope_parameters``: transformers 4 or 5 layout); a
    partial rotary factor is refused (Gemma rotates whole heads)."""
    theta, partial, scaling = rope_parameters(source)
    if partial != 1.0:
        raise WorkbenchError(f"{name} with partial_rotary_factor={partial} is not supported (whole-head rotary)")
    return theta, scaling


def _gemma2_config(cfg: dict) -> dict:
    theta, scaling = _rope(cfg, "Gemma 2")
    # transformers' defaults where a config omits the caps (Gemma 2 has both)
    return {**_common(cfg, "Gemma 2", pattern=2), "family": "gemma2", "rotary_base": theta, "rotary_scaling": scaling,
            "attn_scores_soft_cap": cfg.get("attn_logit_softcapping", 50.0),
            "output_logits_soft_cap": cfg.get("final_logit_softcapping", 30.0)}


def _gemma3_rope(cfg: dict) -> tuple[tuple[float, dict], float]:
    """((θ, scaling) of the full-attention layers, θ of the sliding ones): transformers 5 keeps one rope
    parameter set per layer type, transformers 4 ``rope_theta`` / ``rope_scaling`` and ``rope_local_base_freq``."""
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:
        full, local = {**cfg, "rope_parameters": rp["full_attention"]}, {"rope_parameters": rp.get("sliding_attention") or {}}
    else:
        full = {**cfg, "rope_parameters": None, "rope_theta": cfg.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    local_theta, local_scaling = _rope(local, "Gemma 3")
    if local_scaling:
        raise WorkbenchError("Gemma 3 with scaled rotary frequencies on its sliding layers is not supported")
    return _rope(full, "Gemma 3"), local_theta


def _gemma3_config(cfg: dict) -> dict:
    if cfg.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 stores it but never applies it; the released models have none
        raise WorkbenchError("Gemma 3 with attn_logit_softcapping is not supported (transformers does not apply it)")
    (theta, scaling), local_theta = _gemma3_rope(cfg)
    common = _common(cfg, "Gemma 3", cfg.get("sliding_window_pattern", 6))
    return {**common, "family": "gemma3_text", "rotary_base": theta, "rotary_scaling": scaling, "qk_norm": "head",
            "sliding_rotary_base": local_theta if common["sliding_layers"] else None,
            "output_logits_soft_cap": cfg.get("final_logit_softcapping")}


def _gain(w: Tensor) -> Tensor:
    return 1.0 + w.float()  # Gemma's RMSNorm: x̂ · (1 + w), in float32


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    new = llama_weights(sd, mc, cfg)  # projections, MLP, unembedding; the embedding and every norm below
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    E = sd["embed_tokens.weight"]
    # transformers multiplies the looked-up rows by √d cast to the weights' dtype: the same products
    new["embed.W_E"] = E * torch.tensor(mc.d_model ** 0.5).to(E.dtype)
    new["ln_final.affine.w"] = _gain(sd["norm.weight"])
    sites = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm",
             "ln2_post": "post_feedforward_layernorm"}
    for l in range(mc.n_layers):
        for site, theirs in sites.items():
            new[f"blocks.{l}.{site}.affine.w"] = _gain(sd[f"layers.{l}.{theirs}.weight"])
        if mc.qk_norm is not None:
            for x in ("q", "k"):
                new[f"blocks.{l}.attn.{x}_norm.affine.w"] = _gain(sd[f"layers.{l}.self_attn.{x}_norm.weight"])
    return new


_HF_ACTIVATIONS = {ours: theirs for theirs, ours in _ACTIVATIONS.items()}


def _query_scalar(cfg: ModelConfig) -> float:
    """Gemma's query_pre_attn_scalar: the square of the attention logits' divisor."""
    return (cfg.attn_scale or cfg.d_head ** 0.5) ** 2


def _exportable(cfg: ModelConfig) -> bool:
    """Gemma's shape: its sandwich RMSNorms (peri-rms; Gemma 3 with per-head QK-norm) or no norm at all, GeGLU,
    full rotary, no MLP or unembedding bias, q/k/v/o biases all or none."""
    ln_free = cfg.scheme.stock == "identity"
    gemma3 = cfg.family == "gemma3_text"
    norms = (cfg.scheme.stock == "rms-sandwich" and cfg.qk_norm == ("head" if gemma3 else None)) or (ln_free and cfg.qk_norm is None)
    return (norms and cfg.mlp == "swiglu" and cfg.act_fn in _HF_ACTIVATIONS and cfg.pos == "rope"
            and cfg.rotary_dim == cfg.d_head and not cfg.parallel and not cfg.split_ln1_v and not cfg.split_ln2_up
            and not cfg.unembed_bias and not cfg.mlp_bias and cfg.qkv_bias == cfg.o_bias
            and (gemma3 or cfg.sliding_rotary_base is None) and (not gemma3 or cfg.attn_scores_soft_cap is None)
            and abs(_query_scalar(cfg) - round(_query_scalar(cfg))) < 1e-6)  # an integer in Gemma's config


def _hf_config(cfg: ModelConfig, eps: float, bos: int | None):
    """Gemma 2 / 3's configuration of ``cfg`` (transformers 5: rope parameters per layer type for Gemma 3)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    sliding = set(cfg.sliding_layers if cfg.sliding_layers is not None else
                  (range(cfg.n_layers) if cfg.sliding_window is not None else ()))
    full_rope = {"rope_type": "default", "rope_theta": cfg.rotary_base, **(cfg.rotary_scaling or {})}
    common = dict(vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_key_value_heads, head_dim=cfg.d_head, max_position_embeddings=cfg.n_ctx,
                  rms_norm_eps=eps, hidden_activation=_HF_ACTIVATIONS[cfg.act_fn], attention_bias=cfg.qkv_bias,
                  query_pre_attn_scalar=round(_query_scalar(cfg)),
                  sliding_window=cfg.sliding_window or 4096, final_logit_softcapping=cfg.output_logits_soft_cap,
                  layer_types=["sliding_attention" if l in sliding else "full_attention" for l in range(cfg.n_layers)],
                  tie_word_embeddings=False, bos_token_id=bos, eos_token_id=bos, pad_token_id=bos)
    if cfg.family == "gemma2":
        return Gemma2Config(**common, rope_parameters=full_rope, attn_logit_softcapping=cfg.attn_scores_soft_cap), \
            Gemma2ForCausalLM
    local = {"rope_type": "default", "rope_theta": cfg.sliding_rotary_base or cfg.rotary_base}
    return Gemma3TextConfig(**common, rope_parameters={"full_attention": full_rope, "sliding_attention": local}), \
        Gemma3ForCausalLM


@torch.no_grad()
def export_gemma(model: GPT, out: Path, check_tokens: Tensor | None = None) -> dict:
    """Write ``model`` as a stock Gemma 2 / Gemma 3 (text) directory: the embedding divided back by √d_model
    (transformers multiplies it), every gain g stored as Gemma's w = g − 1, an untied unembedding (removal
    folds the final norm into it); a norm-free model with identity norms (g = √ε, ε = 1e15). Checked against
    transformers' reload (``verify_export``)."""
    cfg = model.cfg
    if not _exportable(cfg):
        raise WorkbenchError("this model is not of Gemma's shape (sandwich RMSNorms, Gemma 3 with per-head QK-norm, "
                             "or norm-free; GeGLU, full rotary, its biases); it cannot be exported as one")
    ln_free = cfg.scheme.stock == "identity"
    eps = LN_FREE_EPS if ln_free else cfg.eps
    gain = stock_norm_weight(ln_free, eps)

    def w(norm, width: int) -> Tensor:  # Gemma's RMSNorm multiplies by (1 + w)
        return gain(norm, width).double() - 1.0

    sd = export_tensors(model)
    sd["model.embed_tokens.weight"] = model.W_E.double() / torch.tensor(cfg.d_model ** 0.5, dtype=torch.float64)
    sd["model.norm.weight"] = w(model.ln_final, cfg.d_model)
    sites = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm",
             "ln2_post": "post_feedforward_layernorm"}
    for l, b in enumerate(model.blocks):
        for site, theirs in sites.items():
            sd[f"model.layers.{l}.{theirs}.weight"] = w(getattr(b, site, None), cfg.d_model)
        if cfg.family == "gemma3_text":
            for x in ("q", "k"):
                sd[f"model.layers.{l}.self_attn.{x}_norm.weight"] = w(getattr(b.attn, f"{x}_norm"), cfg.d_head)
    bos = model.tokenizer.token_to_id(cfg.bos_token) if model.tokenizer is not None else None
    hf_cfg, cls = _hf_config(cfg, eps, bos)
    return write_stock(model, hf_cfg, cls, sd, out, check_tokens)


GEMMA2 = Family(name="gemma2", model_types=("gemma2",), config=_gemma2_config, weights=weights, export=export_gemma,
                finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")
GEMMA3 = Family(name="gemma3_text", model_types=("gemma3_text",), config=_gemma3_config, weights=weights,
                export=export_gemma, finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")
