"""The GPT-NeoX family (Pythia) as the workbench's GPT.

Pre-LayerNorm with biases, two norms per block that both read the block input when
``use_parallel_residual`` (x ← x + attn(ln1(x)) + mlp(ln2(x))), partial rotary positions (the first
``rotary_pct``·d_head dims of each head), an exact-GELU MLP and an untied unembedding. The fused
``query_key_value`` weight is laid out per head: rows [h·3·d_head : (h+1)·3·d_head] are that head's q, k, v.

No exporter: LayerNorm removal on these models writes a workbench run directory.
"""

from __future__ import annotations

from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from .family import Family
from .llama import N_CTX, rope_parameters


def config(cfg: dict) -> dict:
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new"):
        raise WorkbenchError(f"hidden_act={act!r} is not supported in GPT-NeoX (gelu or gelu_new)")
    theta, partial, scaling = rope_parameters(cfg)
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    d_head = d // h
    bias = bool(cfg.get("attention_bias", True))
    return dict(n_layers=cfg["num_hidden_layers"], d_model=d, n_heads=h, d_mlp=cfg["intermediate_size"],
                d_vocab=cfg["vocab_size"], n_ctx=min(cfg.get("max_position_embeddings", N_CTX), N_CTX), norm="pre-ln",
                eps=cfg.get("layer_norm_eps", 1e-5), act_fn=act, pos="rope", rotary_base=theta,
                rotary_dim=int(d_head * partial), rotary_scaling=scaling, parallel=bool(cfg.get("use_parallel_residual", True)),
                qkv_bias=bias, o_bias=bias, mlp_bias=True, unembed_bias=False, family="gpt_neox")


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    sd = {k.removeprefix("gpt_neox."): v for k, v in sd.items()}
    h, dh, d = mc.n_heads, mc.d_head, mc.d_model
    W_U = sd["embed_in.weight"] if cfg.get("tie_word_embeddings", False) else sd["embed_out.weight"]
    new = {"embed.W_E": sd["embed_in.weight"], "unembed.W_U": W_U.T,
           "ln_final.affine.w": sd["final_layer_norm.weight"], "ln_final.affine.b": sd["final_layer_norm.bias"]}
    for l in range(mc.n_layers):
        p, q = f"layers.{l}.", f"blocks.{l}."
        qkv = sd[p + "attention.query_key_value.weight"].reshape(h, 3, dh, d)
        new.update({
            q + "ln1.affine.w": sd[p + "input_layernorm.weight"], q + "ln1.affine.b": sd[p + "input_layernorm.bias"],
            q + "ln2.affine.w": sd[p + "post_attention_layernorm.weight"],
            q + "ln2.affine.b": sd[p + "post_attention_layernorm.bias"],
            q + "attn.W_Q": qkv[:, 0].transpose(1, 2), q + "attn.W_K": qkv[:, 1].transpose(1, 2),
            q + "attn.W_V": qkv[:, 2].transpose(1, 2),
            q + "attn.W_O": sd[p + "attention.dense.weight"].T.reshape(h, dh, d),
            q + "mlp.W_in": sd[p + "mlp.dense_h_to_4h.weight"].T, q + "mlp.b_in": sd[p + "mlp.dense_h_to_4h.bias"],
            q + "mlp.W_out": sd[p + "mlp.dense_4h_to_h.weight"].T, q + "mlp.b_out": sd[p + "mlp.dense_4h_to_h.bias"],
        })
        if mc.qkv_bias:
            b = sd[p + "attention.query_key_value.bias"].reshape(h, 3, dh)
            new.update({q + "attn.b_Q": b[:, 0], q + "attn.b_K": b[:, 1], q + "attn.b_V": b[:, 2],
                        q + "attn.b_O": sd[p + "attention.dense.bias"]})
    return new


GPT_NEOX = Family(name="gpt_neox", model_types=("gpt_neox",), config=config, weights=weights)
