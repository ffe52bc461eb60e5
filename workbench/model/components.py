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
from ..norms.qk_norm import head_norm, proj_norm


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

    def forward(self, tokens: Int[Tensor, "batch pos"], offset: int = 0) -> Float[Tensor, "batch pos d_model"]:
        return self.W_pos[offset: offset + tokens.shape[-1]].unsqueeze(0).expand(tokens.shape[0], -1, -1)


def add_bias(module: nn.Module, name: str, shape: tuple[int, ...], trainable: bool) -> None:
    """A zero-initialised bias: a parameter, or — for families that have none — a zero buffer that
    keeps every reader's algebra (folding, DLA, export) the same but is never trained or saved."""
    if trainable:
        module.register_parameter(name, nn.Parameter(torch.zeros(shape)))
    else:
        module.register_buffer(name, torch.zeros(shape), persistent=False)


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        add_bias(self, "b_U", (cfg.d_vocab,), cfg.unembed_bias)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return torch.addmm(self.b_U, x.reshape(-1, x.shape[-1]), self.W_U).reshape(*x.shape[:-1], -1)


def rotary_inv_freq(rotary_dim: int, base: float, scaling: dict | None = None) -> Float[Tensor, "half"]:
    """The rotation frequencies θ_i = base^(−2i/d), scaled as the config says (``ModelConfig.rotary_scaling``):

    linear  θ_i / factor  (every position divided by the factor)
    llama3  by wavelength λ_i = 2π/θ_i against the pre-training context C: λ > C/low → θ/factor (slow
            dimensions stretched); λ < C/high → θ (fast ones kept); between, with
            s = (C/λ − low)/(high − low), (1 − s)·θ/factor + s·θ."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    kind = (scaling or {}).get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen > context / low, inv_freq / factor,
                           torch.where(wavelen < context / high, inv_freq, blended))
    return inv_freq


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` dims of each head, in the rotate-half
    layout of GPT-NeoX and Llama: (x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin)."""

    def __init__(self, rotary_dim: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.register_buffer("inv_freq", rotary_inv_freq(rotary_dim, base, scaling), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def _cos_sin(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] < n or self._cache[1] != device:
            freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat([freqs, freqs], -1)
            self._cache = (n, device, emb.cos(), emb.sin())
        return self._cache[2][:n], self._cache[3][:n]

    def forward(self, x: Float[Tensor, "batch pos head_index d_head"], offset: int = 0) -> Float[Tensor, "batch pos head_index d_head"]:
        """``offset``: the absolute position of x's first entry (1 behind a sink prefix)."""
        cos, sin = self._cos_sin(offset + x.shape[1], x.device)
        cos, sin = cos[offset:], sin[offset:]
        cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        out = rot * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], -1)


class Attention(nn.Module):
    """Causal self-attention; Q/K read one input and V another (they may differ). Grouped-query
    attention keeps ``n_key_value_heads`` K/V heads, each shared by n_heads / n_key_value_heads query
    heads (``hook_k``/``hook_v`` show the K/V heads, ``hook_z`` every query head). ``hook_attn_scores``
    shows the logits as the softmax reads them: scaled, soft-capped where the config caps them, masked."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, kv, d, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.n_kv, self.d_head = h, kv, dh
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(kv, d, dh))
        self.W_V = nn.Parameter(torch.empty(kv, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        add_bias(self, "b_Q", (h, dh), cfg.qkv_bias)
        add_bias(self, "b_K", (kv, dh), cfg.qkv_bias)
        add_bias(self, "b_V", (kv, dh), cfg.qkv_bias)
        add_bias(self, "b_O", (d,), cfg.o_bias)
        self.window = cfg.sliding_window if cfg.sliding(layer) else None
        # Gemma 3's local layers rotate with their own base and no scaling; every other layer as configured.
        own_base = self.window is not None and cfg.sliding_rotary_base is not None
        base, scaling = (cfg.sliding_rotary_base, {}) if own_base else (cfg.rotary_base, cfg.rotary_scaling)
        self.rotary = Rotary(cfg.rotary_dim, base, scaling) if cfg.pos == "rope" else None
        # None keeps the default √d_head (and the fused kernel's own default scale) bit for bit.
        self.attn_scale = cfg.attn_scale
        self.soft_cap = cfg.attn_scores_soft_cap
        # QK-norm over each head, or over the whole projection (read as [batch, pos, head·d_head] and back);
        # hook_q / hook_k then show the normalized query and key.
        self.qk_whole = cfg.qk_norm == "proj"
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = head_norm(dh, cfg.eps), head_norm(dh, cfg.eps)
        elif self.qk_whole:
            self.q_norm, self.k_norm = proj_norm(h, dh, cfg.eps), proj_norm(kv, dh, cfg.eps)
        else:
            self.q_norm = self.k_norm = None
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, key_pos, kv_head_index, d_head]
        self.hook_v = HookPoint()  # [batch, key_pos, kv_head_index, d_head]
        if self.rotary is not None:
            self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head], after the rotation
            self.hook_rot_k = HookPoint()  # [batch, key_pos, kv_head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        # A fixed key/value for key position 0 (``model/sink.py``): the queries are then positions 1, 2, …
        self.register_buffer("sink_k", None, persistent=False)  # [kv_head_index, d_head]
        self.register_buffer("sink_v", None, persistent=False)

    def _project(self, x: Tensor, W: Tensor, b: Tensor) -> Float[Tensor, "batch pos head_index d_head"]:
        # One (d_model × heads·d_head) matmul instead of a per-head einsum: same numbers, faster.
        W2 = W.permute(1, 0, 2).reshape(W.shape[1], -1)
        return torch.addmm(b.reshape(-1), x.reshape(-1, x.shape[-1]), W2).reshape(*x.shape[:-1], W.shape[0], self.d_head)

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Q, K and V read the same input: one matmul over the stacked weights.
        W = torch.cat([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in (self.W_Q, self.W_K, self.W_V)], 1)
        b = torch.cat([self.b_Q.reshape(-1), self.b_K.reshape(-1), self.b_V.reshape(-1)])
        qkv = torch.addmm(b, x.reshape(-1, x.shape[-1]), W)
        q, k, v = qkv.split([self.n_heads * self.d_head, self.n_kv * self.d_head, self.n_kv * self.d_head], -1)
        return (q.reshape(*x.shape[:-1], self.n_heads, self.d_head), k.reshape(*x.shape[:-1], self.n_kv, self.d_head),
                v.reshape(*x.shape[:-1], self.n_kv, self.d_head))

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
        if self.q_norm is not None:
            q, k = self._qk_normed(self.q_norm, q), self._qk_normed(self.k_norm, k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        offset = 0 if self.sink_k is None else 1
        if self.rotary is not None:
            q, k = self.hook_rot_q(self.rotary(q, offset)), self.hook_rot_k(self.rotary(k, offset))
        if self.sink_k is not None:  # the prefix is key position 0; the hooks above show the sequence's own
            k, v = self._behind_sink(self.sink_k, k), self._behind_sink(self.sink_v, v)
        # The fused kernel has no soft-cap: a capped model always writes the scores out.
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks() or _slow_fused_kernel(q) \
                or self.soft_cap is not None:
            z = self._explicit_attention(q, self._repeat_kv(k), self._repeat_kv(v))
        else:
            # Nobody looks at the pattern: let PyTorch's fused kernel skip materializing it.
            # the fused kernel's is_causal aligns the first query with the first key: not so behind a prefix
            masked = (self.window is not None and k.shape[1] > self.window) or k.shape[1] != q.shape[1]
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=not masked,
                attn_mask=self._mask(q.shape[1], k.shape[1], q.device) if masked else None,
                enable_gqa=self.n_kv != self.n_heads, scale=None if self.attn_scale is None else 1 / self.attn_scale,
            ).transpose(1, 2)
        z = self.hook_z(z)
        W_O = self.W_O.reshape(-1, self.W_O.shape[-1])
        return torch.addmm(self.b_O, z.reshape(-1, W_O.shape[0]), W_O).reshape(*z.shape[:2], -1)

    @staticmethod
    def _behind_sink(prefix: Tensor, x: Float[Tensor, "batch pos kv_head_index d_head"]) -> Tensor:
        return torch.cat([prefix.to(x.dtype)[None, None].expand(x.shape[0], 1, -1, -1), x], dim=1)

    def _qk_normed(self, norm: nn.Module, x: Float[Tensor, "batch pos head_index d_head"]) -> Tensor:
        return norm(x.flatten(-2)).unflatten(-1, x.shape[-2:]) if self.qk_whole else norm(x)

    def _mask(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        """Which keys each query sees (True): the earlier ones, and with a sliding window W only the last W
        (query i, key j: i − W < j ≤ i, positions counted from the first key)."""
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
        if self.window is not None:
            allowed &= torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu(n_k - n_q - self.window + 1)
        return allowed

    def _repeat_kv(self, x: Tensor) -> Tensor:
        """K/V heads expanded to one per query head (query head i reads K/V head i // group)."""
        return x if self.n_kv == self.n_heads else x.repeat_interleave(self.n_heads // self.n_kv, dim=2)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Float[Tensor, "batch pos head_index d_head"]:
        scores = einsum(q, k, "batch pos head d_head, batch key_pos head d_head -> batch head pos key_pos")
        scores = scores / (math.sqrt(self.d_head) if self.attn_scale is None else self.attn_scale)
        if self.soft_cap is not None:
            scores = soft_cap(scores, self.soft_cap)
        scores = self.hook_attn_scores(scores.masked_fill(~self._mask(*scores.shape[-2:], q.device), float("-inf")))
        pattern = self.hook_pattern(scores.float().softmax(-1).to(q.dtype))  # softmax in float32 for bf16 too
        return einsum(pattern, v, "batch head pos key_pos, batch key_pos head d_head -> batch pos head d_head")


def soft_cap(x: Float[Tensor, "..."], cap: float) -> Float[Tensor, "..."]:
    """cap · tanh(x / cap): x where |x| ≪ cap, never beyond ±cap (Gemma 2's attention and output logits)."""
    return torch.tanh(x / cap) * cap


def _slow_fused_kernel(q: Tensor) -> bool:
    """True where the fused attention kernel is slower than two batched matmuls: training in bfloat16 on
    a CPU, whose flash-attention backward in bf16 took 3× its float32 time (small preset, torch 2.13,
    avx512_bf16); the explicit path made a bf16 training step 2.0× faster than float32 instead of 1.3×."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x),
    "silu": F.silu,
}


class MLP(nn.Module):
    """GELU MLP (``mlp="gelu"``) or gated (``mlp="swiglu"``). ``hook_pre`` is the activation's input
    (the gate's pre-activation when gated); ``hook_pre_linear`` the gated MLP's up path W_in x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
            add_bias(self, "b_gate", (cfg.d_mlp,), cfg.mlp_bias)
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        add_bias(self, "b_in", (cfg.d_mlp,), cfg.mlp_bias)
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        add_bias(self, "b_out", (cfg.d_model,), cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def readers(self) -> list[tuple[str, str, str]]:
        """(weight, bias, path) of the matrices that read the MLP's input, for folding a norm into them;
        path "up" is the gated MLP's up path (read through ``ln2_up`` when the block splits ln2)."""
        return [("W_gate", "b_gate", "gate"), ("W_in", "b_in", "up")] if self.gated else [("W_in", "b_in", "gate")]

    def forward(self, x: Float[Tensor, "batch pos d_model"],
                x_up: Float[Tensor, "batch pos d_model"] | None = None) -> Float[Tensor, "batch pos d_model"]:
        """``x_up``: the up path's own input when the block's ln2 is split (removal); else ``x``."""
        flat = x.reshape(-1, x.shape[-1])
        if self.gated:
            flat_up = flat if x_up is None or x_up is x else x_up.reshape(-1, x.shape[-1])
            gate = self.hook_pre(torch.addmm(self.b_gate, flat, self.W_gate).reshape(*x.shape[:-1], -1))
            up = self.hook_pre_linear(torch.addmm(self.b_in, flat_up, self.W_in).reshape(*x.shape[:-1], -1))
            post = self.hook_post(self.act(gate) * up)
        else:
            pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).reshape(*x.shape[:-1], -1))
            post = self.hook_post(self.act(pre))
        return torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out).reshape(x.shape)
