"""Transformer blocks. Pre-norm normalizes each sub-layer's input; Post-norm the residual stream."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import ModelConfig
from .components import MLP, Attention


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = cfg.scheme.make(cfg.norm_context, layer, "ln1")
        self.ln2 = cfg.scheme.make(cfg.norm_context, layer, "ln2")
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]


class PreNormBlock(_Block):
    """x ← x + attn(ln1(x));  x ← x + mlp(ln2(x)).

    Parallel (GPT-NeoX): x ← x + attn(ln1(x)) + mlp(ln2(x)), both reading the block's input;
    ``hook_resid_mid`` is then x + attn_out, so resid_post = resid_mid + mlp_out still holds."""

    placement = "pre"

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        # ln1 on the V path: a separate module only once LayerNorm removal splits it from Q/K.
        self.ln1_v = cfg.scheme.make(cfg.norm_context, layer, "ln1") if cfg.split_ln1_v else None
        # ln2 on the gated MLP's up path: likewise a separate module only once removal splits it.
        self.ln2_up = cfg.scheme.make(cfg.norm_context, layer, "ln2") if cfg.split_ln2_up else None
        self.parallel = cfg.parallel

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        qk_in = self.ln1(x)
        v_in = qk_in if self.ln1_v is None else self.ln1_v(x)
        mid = self.hook_resid_mid(x + self.hook_attn_out(self.attn(qk_in, v_in)))
        mlp_src = x if self.parallel else mid
        mlp_in = self.ln2(mlp_src)
        up_in = mlp_in if self.ln2_up is None else self.ln2_up(mlp_src)
        return self.hook_resid_post(mid + self.hook_mlp_out(self.mlp(mlp_in, up_in)))


class PostNormBlock(_Block):
    """x ← ln1(x + attn(x));  x ← ln2(x + mlp(x))."""

    placement = "post"

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(self.ln1(x + self.hook_attn_out(self.attn(x, x))))
        return self.hook_resid_post(self.ln2(x + self.hook_mlp_out(self.mlp(x))))


class PeriNormBlock(PreNormBlock):
    """Peri-LN / sandwich: x ← x + ln1_post(attn(ln1(x)));  x ← x + ln2_post(mlp(ln2(x))).

    The norms after each sublayer (``ln1_post``, ``ln2_post``) scale what is *added* to the residual
    stream: ``hook_attn_out`` / ``hook_mlp_out`` are the post-normed outputs, so resid_mid = resid_pre +
    attn_out still holds, but the heads' z·W_O sum to the post-norm's input, not to attn_out. A scheme
    without pre-norms (OLMo-2's reordered norm) makes ``ln1``/``ln2`` identities. LayerNorm removal may
    split ln1 and ln2 as in a Pre-norm block (``ln1_v``, ``ln2_up``)."""

    placement = "peri"

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.ln1_post = cfg.scheme.make(cfg.norm_context, layer, "ln1_post")
        self.ln2_post = cfg.scheme.make(cfg.norm_context, layer, "ln2_post")

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        qk_in = self.ln1(x)
        v_in = qk_in if self.ln1_v is None else self.ln1_v(x)
        mid = self.hook_resid_mid(x + self.hook_attn_out(self.ln1_post(self.attn(qk_in, v_in))))
        mlp_in = self.ln2(mid)
        up_in = mlp_in if self.ln2_up is None else self.ln2_up(mid)
        return self.hook_resid_post(mid + self.hook_mlp_out(self.ln2_post(self.mlp(mlp_in, up_in))))


BLOCKS = {"pre": PreNormBlock, "post": PostNormBlock, "peri": PeriNormBlock}
