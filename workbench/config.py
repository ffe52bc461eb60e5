"""Model configuration.

Field names follow TransformerLens' ``HookedTransformerConfig`` so that TL utilities which read
``model.cfg`` (``ActivationCache.decompose_resid``, ``logit_attrs``, ...) work on our models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import WorkbenchError


@dataclass
class ModelConfig:
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_vocab: int = 2048
    n_ctx: int = 128
    norm: str = "pre-ln"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    d_head: int | None = None
    d_mlp: int | None = None
    eps: float = 1e-5
    init_range: float = 0.02
    act_fn: str = "gelu_new"
    attn_only: bool = False
    # The ln1 of each Pre-norm block feeds V through its own module (LayerNorm removal freezes the
    # Q/K path and the V path at different times, so they must be separable).
    split_ln1_v: bool = False

    def __post_init__(self) -> None:
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise WorkbenchError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose d_model as a multiple of n_heads or set d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx", "d_head", "d_mlp"):
            if int(getattr(self, name)) <= 0:
                raise WorkbenchError(f"model config: {name} must be positive, got {getattr(self, name)}")
        from .norms import get_scheme  # late import: norms register themselves on import

        self.scheme = get_scheme(self.norm)
        self.scheme.check(self)

    # --- attributes TransformerLens' ActivationCache reads -------------------------------------
    @property
    def normalization_type(self) -> str | None:
        return self.scheme.tl_normalization_type

    @property
    def final_rms(self) -> bool:
        return self.scheme.tl_normalization_type in ("RMS", "RMSPre")

    positional_embedding_type = "standard"
    default_prepend_bos = True
    use_attn_result = False
    device = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise WorkbenchError(f"model config has unknown fields {sorted(unknown)}; is it from a newer workbench?")
        return cls(**d)
