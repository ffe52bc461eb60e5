"""OLMo-2 as the workbench's GPT: the Llama family's projections, SwiGLU MLP and rotary layout (``llama.py``)
with OLMo-2's norms moved:

* no norm on a sub-layer's input; an RMSNorm on its output before the residual add (``post-sub``):
  post_attention_layernorm → ``ln1_post``, post_feedforward_layernorm → ``ln2_post``, norm → ``ln_final``;
  ``ln1`` / ``ln2`` are identities;
* QK-norm over the whole projection (``qk_norm="proj"``): one RMSNorm with gain over the n_heads·d_head
  query values of a token, one over its n_kv_heads·d_head key values, after the projection (and its bias),
  before the rotary embedding (``blocks.{l}.attn.q_norm`` / ``k_norm``);
* ``attention_bias`` puts biases on q, k, v and o alike; the MLP has none.

Refused in one line: sliding windows or other layer types, a partial rotary factor (transformers' OLMo-2
rotates whole heads whatever the config says), rope scalings other than ``linear`` / ``llama3``, any
activation but silu. ``convert`` refuses (live QK-norms and post-sub-layer norms do not fold).

The exporter writes a stock ``Olmo2ForCausalLM`` directory: an OLMo-2 model as it is, or its norm-free
version after ``remove-ln`` with every norm an identity (a gain of √ε, ε = 1e15, as every norm-free export).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from ..model import GPT
from .family import LN_FREE_EPS, Family, read_back_ln_free, stock_attention, stock_norm_weight, write_stock
from .llama import REMOVAL_DEFAULTS, common_config, config_of, export_tensors, projections


def _config(cfg: dict) -> dict:
    layer_types = set(cfg.get("layer_types") or ["full_attention"])
    if cfg.get("sliding_window") is not None or cfg.get("use_sliding_window") or layer_types != {"full_attention"}:
        raise WorkbenchError("OLMo-2 with sliding-window attention or other layer types is not supported (full causal "
                             "attention in every layer only)")
    bias = bool(cfg.get("attention_bias", False))
    kw = config_of(cfg, qkv_bias=bias, o_bias=bias, mlp_bias=False, family="olmo2")
    if kw["rotary_dim"] != kw["d_head"]:
        raise WorkbenchError(f"OLMo-2 with a partial rotary factor ({kw['rotary_dim']} of {kw['d_head']} dims) is not "
                             "supported (transformers rotates whole heads)")
    return {**kw, "norm": "post-sub", "qk_norm": "proj"}


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    new = projections(sd, mc, cfg)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    new["ln_final.affine.w"] = sd["norm.weight"]
    for l in range(mc.n_layers):
        p, q = f"layers.{l}.", f"blocks.{l}."
        new[q + "ln1_post.affine.w"] = sd[p + "post_attention_layernorm.weight"]
        new[q + "ln2_post.affine.w"] = sd[p + "post_feedforward_layernorm.weight"]
        new[q + "attn.q_norm.affine.w"] = sd[p + "self_attn.q_norm.weight"]
        new[q + "attn.k_norm.affine.w"] = sd[p + "self_attn.k_norm.weight"]
    return new


def _exportable(cfg: ModelConfig) -> bool:
    """OLMo-2's shape: its own norms (post-sub, whole-projection QK-norm) or none at all, SwiGLU, full unscaled
    rotary, full attention, q/k/v/o biases all or none, no MLP or unembedding bias."""
    ln_free = cfg.scheme.stock == "identity"
    norms = (cfg.scheme.stock == "rms-post-sub" and cfg.qk_norm == "proj") or (ln_free and cfg.qk_norm is None)
    return (norms and cfg.mlp == "swiglu" and cfg.act_fn == "silu" and cfg.pos == "rope" and cfg.rotary_dim == cfg.d_head
            and not cfg.parallel and not cfg.split_ln1_v and not cfg.split_ln2_up and not cfg.rotary_scaling
            and stock_attention(cfg) and not cfg.unembed_bias and not cfg.mlp_bias and cfg.qkv_bias == cfg.o_bias)


@torch.no_grad()
def export_olmo2(model: GPT, out: Path, check_tokens: Tensor | None = None) -> dict:
    """Write ``model`` as a stock OLMo-2 directory, checked against transformers' reload (``verify_export``)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = model.cfg
    if not _exportable(cfg):
        raise WorkbenchError("this model is not of OLMo-2's shape (post-sub norms with a whole-projection QK-norm, or "
                             "norm-free; SwiGLU, full unscaled rotary, full attention, its biases); it cannot be exported as one")
    ln_free = cfg.scheme.stock == "identity"
    eps = LN_FREE_EPS if ln_free else cfg.eps
    norm_weight = stock_norm_weight(ln_free, eps)
    d, q, k = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    sd = {**export_tensors(model), "model.norm.weight": norm_weight(model.ln_final, d)}
    for l, b in enumerate(model.blocks):
        p, a = f"model.layers.{l}.", f"model.layers.{l}.self_attn."
        post = (None, None) if ln_free else (b.ln1_post, b.ln2_post)  # a norm-free model has none to read
        sd.update({p + "post_attention_layernorm.weight": norm_weight(post[0], d),
                   p + "post_feedforward_layernorm.weight": norm_weight(post[1], d),
                   a + "q_norm.weight": norm_weight(b.attn.q_norm, q), a + "k_norm.weight": norm_weight(b.attn.k_norm, k)})
    bos = model.tokenizer.token_to_id(cfg.bos_token) if model.tokenizer is not None else None
    hf_cfg = Olmo2Config(**common_config(cfg, eps, bos), attention_bias=cfg.qkv_bias)
    return write_stock(model, hf_cfg, Olmo2ForCausalLM, sd, out, check_tokens)


OLMO2 = Family(name="olmo2", model_types=("olmo2",), config=_config, weights=weights, export=export_olmo2,
               finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")

