"""Qwen3 as the workbench's GPT: the Llama family's layout (``llama.py``) without q/k/v biases, plus
QK-norm — an RMSNorm with gain over each head's query and key after the projection, before the rotary
embedding (``ModelConfig.qk_norm = "head"``; ``blocks.{l}.attn.q_norm`` / ``k_norm``).

Sliding-window layers (``use_sliding_window``, ``layer_types`` other than full attention) are refused in
one line: the workbench implements full causal attention only. The exporter is the Llama family's
(``llama.export_llama``), which writes Qwen3's per-head q/k norms too — as identities (a gain of √ε with
ε = 1e15, as every norm of a norm-free export) once ``remove-ln`` has removed them.
"""

from __future__ import annotations

from torch import Tensor

from ..config import ModelConfig
from ..errors import WorkbenchError
from .family import Family, read_back_ln_free
from .llama import REMOVAL_DEFAULTS, config_of, export_llama, weights as llama_weights


def _config(cfg: dict) -> dict:
    layer_types = set(cfg.get("layer_types") or ["full_attention"])
    if cfg.get("use_sliding_window", False) or layer_types != {"full_attention"}:
        raise WorkbenchError("Qwen3 with sliding-window attention is not supported (full causal attention only)")
    if cfg.get("attention_bias", False):
        raise WorkbenchError("Qwen3 with attention biases is not supported (the released models have none)")
    return {**config_of(cfg, qkv_bias=False, o_bias=False, mlp_bias=False, family="qwen3"), "qk_norm": "head"}


def weights(sd: dict[str, Tensor], mc: ModelConfig, cfg: dict) -> dict[str, Tensor]:
    new = llama_weights(sd, mc, cfg)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    for l in range(mc.n_layers):
        a = f"layers.{l}.self_attn."
        new[f"blocks.{l}.attn.q_norm.affine.w"] = sd[a + "q_norm.weight"]
        new[f"blocks.{l}.attn.k_norm.affine.w"] = sd[a + "k_norm.weight"]
    return new


QWEN3 = Family(name="qwen3", model_types=("qwen3",), config=_config, weights=weights, export=export_llama,
               finish=read_back_ln_free, removal_defaults=REMOVAL_DEFAULTS, removal_output="export")
