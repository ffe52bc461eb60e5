"""Embeddings, attention and MLP in TransformerLens' weight layout and hook names.

Dimensions: batch, pos (query position), key_pos, head_index, d_model, d_head, d_mlp, d_vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import ModelConfig


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_pos[: tokens.shape[-1]].unsqueeze(0).expand(tokens.shape[0], -1, -1)


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return torch.addmm(self.b_U, x.reshape(-1, x.shape[-1]), self.W_U).reshape(*x.shape[:-1], -1)


class Attention(nn.Module):
    """Multi-head causal self-attention; Q/K read one input and V another (they may differ)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.d_head = h, dh
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, key_pos, head_index, d_head]
        self.hook_v = HookPoint()  # [batch, key_pos, head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]

    def _project(self, x: Tensor, W: Tensor, b: Tensor) -> Float[Tensor, "batch pos head_index d_head"]:
        # One (d_model × heads·d_head) matmul instead of a per-head einsum: same numbers, faster.
        W2 = W.permute(1, 0, 2).reshape(W.shape[1], -1)
        return torch.addmm(b.reshape(-1), x.reshape(-1, x.shape[-1]), W2).reshape(
            *x.shape[:-1], self.n_heads, self.d_head
        )

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Q, K and V read the same input: one matmul over the stacked weights.
        W = torch.cat([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in (self.W_Q, self.W_K, self.W_V)], 1)
        b = torch.cat([self.b_Q.reshape(-1), self.b_K.reshape(-1), self.b_V.reshape(-1)])
        qkv = torch.addmm(b, x.reshape(-1, x.shape[-1]), W)
        return tuple(t.reshape(*x.shape[:-1], self.n_heads, self.d_head) for t in qkv.chunk(3, dim=-1))

    def forward(
        self,
        qk_input: Float[Tensor, "batch pos d_model"],
        v_input: Float[Tensor, "batch pos d_model"],
    ) -> Float[Tensor, "batch pos d_model"]:
        if qk_input is v_input:
            q, k, v = self._project_qkv(qk_input)
        else:
            q = self._project(qk_input, self.W_Q, self.b_Q)
            k = self._project(qk_input, self.W_K, self.b_K)
            v = self._project(v_input, self.W_V, self.b_V)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self._explicit_attention(q, k, v)
        else:
            # Nobody looks at the pattern: let PyTorch's fused kernel skip materializing it.
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        z = self.hook_z(z)
        W_O = self.W_O.reshape(-1, self.W_O.shape[-1])
        return torch.addmm(self.b_O, z.reshape(-1, W_O.shape[0]), W_O).reshape(*z.shape[:2], -1)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Float[Tensor, "batch pos head_index d_head"]:
        scores = einsum(q, k, "batch pos head d_head, batch key_pos head d_head -> batch head pos key_pos")
        scores = scores / math.sqrt(self.d_head)
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(-1))
        return einsum(pattern, v, "batch head pos key_pos, batch key_pos head d_head -> batch pos head d_head")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.approximate = "tanh" if cfg.act_fn == "gelu_new" else "none"
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = x.reshape(-1, x.shape[-1])
        pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).reshape(*x.shape[:-1], -1))
        post = self.hook_post(F.gelu(pre, approximate=self.approximate))
        return torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out).reshape(x.shape)
