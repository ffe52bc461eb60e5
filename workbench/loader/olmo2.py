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
activation but silu. No exporter: ``export`` refuses in one line, as ``convert`` does (live QK-norms and
post-sub-layer norms do not fold).
"""

from __future__ import annotations

from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from .family import Family
from .llama import config_of, projections


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


OLMO2 = Family(name="olmo2", model_types=("olmo2",), config=_config, weights=weights)
