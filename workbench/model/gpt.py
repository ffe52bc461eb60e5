"""The GPT family: one decoder whose normalization is chosen by name from the registry.

Learned positional embeddings, GELU MLP, multi-head causal attention, untied unembedding; built on
TransformerLens' ``HookedRootModule`` so hooks, ``run_with_cache`` and ``ActivationCache`` work.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..config import ModelConfig
from ..errors import WorkbenchError
from .blocks import BLOCKS
from .cache import NormAwareCache
from .components import Embed, PosEmbed, Unembed, soft_cap
from .sink import check_input

ReturnType = Literal["logits", "loss", "both"] | None


class GPT(HookedRootModule):
    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.pos == "learned":  # rotary models carry position in Q and K instead
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(
            BLOCKS[cfg.scheme.placement(cfg.norm_context, layer)](cfg, layer) for layer in range(cfg.n_layers)
        )
        self.ln_final = cfg.scheme.make(cfg.norm_context, None, "ln_final")
        self.unembed = Unembed(cfg)
        # A fixed attention-sink prefix at position 0 (``model/sink.py``; None: position 0 is computed).
        self.sink_token: int | None = None
        self.register_buffer("sink_logits", None, persistent=False)  # [d_vocab]
        self.init_weights()
        self.setup()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual-writing matrices scaled by 1/sqrt(2L), biases zero."""
        std = self.cfg.init_range
        for name, p in self.named_parameters():
            if name.endswith(("W_O", "W_out")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            elif name.split(".")[-1].startswith("W_"):
                nn.init.normal_(p, std=std)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
    ):
        if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
            tokens = self.to_tokens(tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise WorkbenchError(
                f"input has {tokens.shape[-1]} tokens but the model's context is {self.cfg.n_ctx}; "
                "shorten the text or truncate the tokens"
            )
        logits = self._logits(tokens) if self.sink_token is None else self._behind_sink(tokens)
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy(logits, tokens, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _logits(self, tokens: Int[Tensor, "batch pos"], offset: int = 0) -> Float[Tensor, "batch pos d_vocab"]:
        for residual in self._stream(tokens, offset):  # only the last is kept alive
            pass
        return self.final_logits(residual)

    def _stream(self, tokens: Int[Tensor, "batch pos"], offset: int = 0):
        """The residual stream after the embedding, then after each block."""
        residual = self.hook_embed(self.embed(tokens))
        if self.cfg.pos == "learned":
            residual = residual + self.hook_pos_embed(self.pos_embed(tokens, offset))
        yield residual
        for block in self.blocks:
            residual = block(residual)
            yield residual

    def block_outputs(self, tokens: Int[Tensor, "batch pos"]) -> list[Float[Tensor, "batch pos d_model"]]:
        """The residual stream after each block (``hook_resid_post``), without the unembedding: what a scan
        over the whole vocabulary reads. Behind a sink prefix, positions 1, 2, … only (as the hooks)."""
        if self.sink_token is not None:
            check_input(self, tokens)
            tokens, offset = tokens[:, 1:], 1
        else:
            offset = 0
        return list(self._stream(tokens, offset))[1:]

    def _behind_sink(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Position 0 is the fixed prefix (its stored logits); positions ≥ 1 are computed and attend to it.
        The hooks see positions 1, 2, … only."""
        check_input(self, tokens)
        first = self.sink_logits.expand(tokens.shape[0], 1, -1)
        if tokens.shape[1] == 1:
            return first
        rest = self._logits(tokens[:, 1:], offset=1)
        return torch.cat([first.to(rest.dtype), rest], dim=1)

    def final_logits(self, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """The logits of a final residual: ln_final, the unembedding and, where the config caps them, the
        output soft-cap — which makes them non-linear in the residual even with the norm's scale frozen."""
        logits = self.unembed(self.ln_final(residual))
        cap = self.cfg.output_logits_soft_cap
        return logits if cap is None else soft_cap(logits, cap)

    def run_with_cache(self, *args, **kwargs) -> tuple[Tensor, NormAwareCache]:
        remove_batch_dim = kwargs.get("remove_batch_dim", False)
        out, cache_dict = super().run_with_cache(*args, **kwargs)
        return out, NormAwareCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # --- what TransformerLens' ActivationCache reads ----------------------------------------------
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.b_U

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if self.cfg.pos != "learned":
            raise WorkbenchError(f"a model with {self.cfg.pos} positions has no W_pos")
        return self.pos_embed.W_pos

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding column of each token: the residual direction its logit reads."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U[:, tokens].movedim(0, -1)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, "d_model"]:
        """Sum of the output biases (b_O, b_out) written to the residual stream before ``layer``."""
        total = torch.zeros(self.cfg.d_model, device=self.W_U.device, dtype=self.W_U.dtype)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise WorkbenchError(f"mlp_input needs layer < n_layers={self.cfg.n_layers}, got {layer}")
            total = total + self.blocks[layer].attn.b_O
        return total

    # --- tokenizer helpers (TransformerLens idiom) ---------------------------------------------
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise WorkbenchError("this model has no tokenizer; load it from a run directory with workbench.load")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize; position 0 holds the document-start token (``cfg.bos_token``: <|endoftext|> for
        workbench and GPT-2 models, as during training). Pads right with it."""
        tok = self._tok()
        texts = [text] if isinstance(text, str) else list(text)
        bos = [self.bos_token_id] if prepend_bos or self.sink_token is not None else []
        ids = [bos + e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        width = max(len(i) for i in ids)
        out = torch.full((len(ids), width), self.bos_token_id, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        return out

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str | list[str]:
        if isinstance(tokens, Tensor) and tokens.dim() > 1:
            return [self.to_string(t) for t in tokens]
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return self._tok().decode(ids, skip_special_tokens=False)

    def to_str_tokens(self, text: str | Int[Tensor, "pos"], prepend_bos: bool = True) -> list[str]:
        ids = self.to_tokens(text, prepend_bos)[0] if isinstance(text, str) else text.flatten()
        return [self._tok().decode([int(i)], skip_special_tokens=False) for i in ids]

    @property
    def bos_token_id(self) -> int:
        """The document-start token: the sink prefix's token for a model with one (its input starts with it)."""
        if self.sink_token is not None:
            return self.sink_token
        i = self._tok().token_to_id(self.cfg.bos_token)
        if i is None:
            raise WorkbenchError(f"the tokenizer has no {self.cfg.bos_token} token (the model's document start)")
        return i

    def to_single_token(self, string: str) -> int:
        ids = self._tok().encode(string, add_special_tokens=False).ids
        if len(ids) != 1:
            raise WorkbenchError(f"{string!r} is {len(ids)} tokens, not one; pick a string that is a single token")
        return ids[0]


def lm_cross_entropy(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], per_token: bool = False
) -> Float[Tensor, ""] | Float[Tensor, "batch pos-1"]:
    """Next-token cross-entropy in nats, computed in float32 (also for bf16 logits)."""
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).reshape(tokens.shape[0], -1)
    return loss if per_token else loss.mean()
