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

No exporter; remove-ln, convert and DLA refuse these models in one line (their post-sublayer norms; DLA
also the capped logits). Loaded in float32 like every family: cast to bfloat16, the gains 1 + w round to
bf16 where transformers keeps them in float32 — close to its bf16 model, not bit-equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from .family import Family
from .llama import N_CTX, rope_parameters, weights as llama_weights

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


GEMMA2 = Family(name="gemma2", model_types=("gemma2",), config=_gemma2_config, weights=weights)
GEMMA3 = Family(name="gemma3_text", model_types=("gemma3_text",), config=_gemma3_config, weights=weights)
