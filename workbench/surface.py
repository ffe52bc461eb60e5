"""The one model surface every analysis, page and notebook reads.

``workbench.load(spec)`` returns a ``workbench.model.GPT`` for every spec — the workbench's own runs and
every supported Hugging Face family alike (the family adapters in ``workbench.loader`` map checkpoints
onto it). This Protocol names what the analyses may rely on, in TransformerLens' idiom; code that needs
anything else is reaching past the surface.

Hook names (every family): ``hook_embed`` (``hook_pos_embed`` with learned positions),
``blocks.{l}.hook_resid_pre|hook_resid_mid|hook_resid_post``, ``blocks.{l}.ln1|ln2.hook_scale|
hook_normalized`` (and ``ln1_post|ln2_post`` after each sub-layer in sandwich models: Gemma, peri-ln),
``ln_final.hook_scale|hook_normalized``, ``blocks.{l}.attn.hook_q|hook_k|hook_v|
hook_attn_scores|hook_pattern|hook_z`` (``hook_rot_q|hook_rot_k`` with rotary positions),
``blocks.{l}.hook_attn_out|hook_mlp_out``, ``blocks.{l}.mlp.hook_pre|hook_post`` (``hook_pre_linear``
for gated MLPs).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float, Int
from torch import Tensor, nn

from .config import ModelConfig
from .model.cache import NormAwareCache
from .norms import Norm


@runtime_checkable
class HookedModel(Protocol):
    cfg: ModelConfig  # n_layers, d_model, n_heads, n_ctx, d_vocab, norm, mlp, pos, family, ...
    tokenizer: Any  # a tokenizers.Tokenizer
    ln_final: Norm  # every norm site is a workbench Norm: standardize + affine, hook_scale, frozen()
    blocks: nn.ModuleList  # each with ln1, ln2 (Norm), attn (W_Q, W_K, W_V, W_O, b_*), mlp (W_in, W_out, b_*)

    def __call__(self, tokens: Int[Tensor, "batch pos"], return_type: str | None = "logits") -> Any: ...

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]: ...

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str | list[str]: ...

    def to_str_tokens(self, text: str | Int[Tensor, "pos"], prepend_bos: bool = True) -> list[str]: ...

    def to_single_token(self, string: str) -> int: ...

    def hooks(self, fwd_hooks: list = ..., bwd_hooks: list = ..., reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> AbstractContextManager: ...

    def run_with_cache(self, *args, **kwargs) -> tuple[Tensor, NormAwareCache]: ...

    def final_logits(self, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]: ...

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]: ...

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]: ...
