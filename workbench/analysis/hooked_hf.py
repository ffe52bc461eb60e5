"""A Hugging Face Llama-architecture model with the workbench's TransformerLens hook names, so that
activation/attribution patching and the confidence-neuron analysis run on it unchanged.

HookPoints are declared here and called from PyTorch hooks on the model's own modules (the model's
code is not touched); the final RMSNorm is swapped for the workbench's ``Norm``, which computes the
same thing and exposes ``ln_final.hook_scale``:

    blocks.{l}.hook_resid_pre   [batch, pos, d_model]          input of decoder layer l
    blocks.{l}.attn.hook_z      [batch, pos, head_index, d_head] input of o_proj, split by head
    blocks.{l}.mlp.hook_post    [batch, pos, d_mlp]             act(gate) · up, input of down_proj
    blocks.{l}.hook_mlp_out     [batch, pos, d_model]
    ln_final.hook_scale         [batch, pos, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..errors import WorkbenchError
from ..tokenizer import EOT


@dataclass
class HookedConfig:
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: str


class _AttnHooks(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]


class _MLPHooks(nn.Module):
    def __init__(self, down_proj: nn.Linear):
        super().__init__()
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        self._down = [down_proj]  # not a submodule: the weights stay the model's

    @property
    def W_out(self) -> Tensor:
        return self._down[0].weight.T


class _BlockHooks(nn.Module):
    def __init__(self, down_proj: nn.Linear):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.attn = _AttnHooks()
        self.mlp = _MLPHooks(down_proj)
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]


class HookedLlama(HookedRootModule):
    def __init__(self, hf: nn.Module, tokenizer, name: str = "", n_ctx: int = 256):
        super().__init__()
        from ..removal.llama import check_llama, rms_as_norm

        check_llama(hf)
        cfg = hf.config
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cfg = HookedConfig(cfg.num_hidden_layers, cfg.num_attention_heads, d_head, cfg.hidden_size,
                                cfg.intermediate_size, cfg.vocab_size, min(n_ctx, cfg.max_position_embeddings),
                                f"RMSNorm (pretrained {name})" if name else "RMSNorm")
        self.tokenizer = tokenizer
        layers = hf.model.layers
        # Registered before ``hf`` so that the hook points get these (TransformerLens) names.
        self.blocks = nn.ModuleList(_BlockHooks(layer.mlp.down_proj) for layer in layers)
        if not isinstance(hf.model.norm, nn.Module) or type(hf.model.norm).__name__.endswith("RMSNorm"):
            hf.model.norm = rms_as_norm(hf.model.norm)
        self.ln_final = hf.model.norm
        self.hf = hf
        for layer, hooks in zip(layers, self.blocks):
            layer.register_forward_pre_hook(lambda m, args, kwargs, h=hooks: ((h.hook_resid_pre(args[0]), *args[1:]), kwargs),
                                            with_kwargs=True)
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, h=hooks: (self._z(h, args[0]),))
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, h=hooks: (h.mlp.hook_post(args[0]),))
            layer.mlp.register_forward_hook(lambda m, args, out, h=hooks: h.hook_mlp_out(out))
        self.setup()

    def _z(self, hooks: _BlockHooks, z: Tensor) -> Tensor:
        split = z.reshape(*z.shape[:-1], self.cfg.n_heads, self.cfg.d_head)
        return hooks.attn.hook_z(split).reshape(z.shape)

    def forward(self, tokens: Int[Tensor, "batch pos"], return_type: str | None = "logits"):
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        logits = self.hf(input_ids=tokens, use_cache=False).logits
        if return_type == "loss":
            from ..model.gpt import lm_cross_entropy

            return lm_cross_entropy(logits, tokens)
        return logits

    @property
    def W_U(self) -> Tensor:
        return self.hf.lm_head.weight.T

    @property
    def b_U(self) -> Tensor:
        b = getattr(self.hf.lm_head, "bias", None)
        return b if b is not None else torch.zeros(self.cfg.d_vocab, dtype=self.W_U.dtype, device=self.W_U.device)

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Tensor:
        """<|endoftext|> at position 0 (as in the workbench's data), then the text; pads right with it."""
        texts = [text] if isinstance(text, str) else list(text)
        bos = self.tokenizer.token_to_id(EOT)
        ids = [([bos] if prepend_bos and bos is not None else []) + self.tokenizer.encode(t, add_special_tokens=False).ids
               for t in texts]
        out = torch.full((len(ids), max(map(len, ids))), bos if bos is not None else 0, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i)
        return out

    def to_single_token(self, string: str) -> int:
        ids = self.tokenizer.encode(string, add_special_tokens=False).ids
        if len(ids) != 1:
            raise WorkbenchError(f"{string!r} is {len(ids)} tokens, not one; pick a string that is a single token")
        return ids[0]


def load_for_analysis(spec: str | Path):
    """Workbench runs and GPT-2 directories as ``GPT``; other Hugging Face (Llama) models as a
    ``HookedLlama`` with the same hook names, so the same analyses run on both."""
    import workbench

    from ..hf import runs_through_hf_modules

    return load_hooked(str(spec)) if runs_through_hf_modules(spec) else workbench.load(spec)


def load_hooked(spec: str, n_ctx: int = 256) -> HookedLlama:
    from ..hf import load_causal_lm

    hf, tok = load_causal_lm(spec)
    return HookedLlama(hf, tok.backend_tokenizer, name=str(spec), n_ctx=n_ctx).eval()
