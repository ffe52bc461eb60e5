"""A plain-PyTorch Pre-LN GPT (nanoGPT style: fused QKV, nn.LayerNorm, SDPA), written independently
of workbench. Used as the reference the hooked `pre-ln` model must equal, and as the speed baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int, n_ctx: int, d_vocab: int, eps: float = 1e-5):
        super().__init__()
        self.wte = nn.Embedding(d_vocab, d_model)
        self.wpe = nn.Embedding(n_ctx, d_model)
        self.h = nn.ModuleList(Block(d_model, n_heads, eps) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.lm_head = nn.Linear(d_model, d_vocab)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for blk in self.h:
            for p in (blk.attn.proj.weight, blk.mlp.proj.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, tokens, targets=None):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def plain_from_workbench(model) -> PlainGPT:
    """Copy a workbench `pre-ln` model's weights into a PlainGPT (TL layout → fused nn.Linear)."""
    cfg = model.cfg
    plain = PlainGPT(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_ctx, cfg.d_vocab, cfg.eps)
    plain.wte.weight.copy_(model.embed.W_E)
    plain.wpe.weight.copy_(model.pos_embed.W_pos)
    for blk, ours in zip(plain.h, model.blocks):
        a = ours.attn
        # W_Q[h, d_model, d_head] -> rows of nn.Linear weight [out = h*d_head, in = d_model]
        w = [W.permute(0, 2, 1).reshape(-1, cfg.d_model) for W in (a.W_Q, a.W_K, a.W_V)]
        blk.attn.qkv.weight.copy_(torch.cat(w, 0))
        blk.attn.qkv.bias.copy_(torch.cat([b.reshape(-1) for b in (a.b_Q, a.b_K, a.b_V)]))
        blk.attn.proj.weight.copy_(a.W_O.reshape(-1, cfg.d_model).T)
        blk.attn.proj.bias.copy_(a.b_O)
        blk.mlp.fc.weight.copy_(ours.mlp.W_in.T)
        blk.mlp.fc.bias.copy_(ours.mlp.b_in)
        blk.mlp.proj.weight.copy_(ours.mlp.W_out.T)
        blk.mlp.proj.bias.copy_(ours.mlp.b_out)
        for ln, src in ((blk.ln_1, ours.ln1), (blk.ln_2, ours.ln2)):
            ln.weight.copy_(src.affine.w)
            ln.bias.copy_(src.affine.b)
    plain.ln_f.weight.copy_(model.ln_final.affine.w)
    plain.ln_f.bias.copy_(model.ln_final.affine.b)
    plain.lm_head.weight.copy_(model.unembed.W_U.T)
    plain.lm_head.bias.copy_(model.unembed.b_U)
    return plain
