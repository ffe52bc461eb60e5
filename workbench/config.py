"""Model configuration.

Field names follow TransformerLens' ``HookedTransformerConfig`` so that TL utilities which read
``model.cfg`` (``ActivationCache.decompose_resid``, ``logit_attrs``, ...) work on our models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import WorkbenchError


MLP_KINDS = ("gelu", "swiglu")
POS_KINDS = ("learned", "rope")
ACT_FNS = ("gelu_new", "gelu", "silu")
# QK-norm: "head" = an RMSNorm (with gain) over each head's query and key (Qwen3, Gemma 3); "proj" = one
# over the whole query projection (n_heads·d_head) and the whole key projection (n_kv_heads·d_head) (OLMo-2).
QK_NORMS = ("head", "proj")
# What a field read from a file may hold, by its annotation (bool is an int to Python, not to a config).
_JSON_TYPES = {"int": (int,), "int | None": (int, type(None)), "float": (int, float), "str": (str,),
               "bool": (bool,), "dict[str, Any]": (dict,), "str | None": (str, type(None)),
               "float | None": (int, float, type(None)), "list[int] | None": (list, type(None))}


ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rotary_scaling(scaling: dict[str, Any], pos: str) -> None:
    """One line for a rotary scaling the workbench does not implement exactly, or one missing a value."""
    if not scaling:
        return
    kind = scaling.get("rope_type")
    if pos != "rope":
        raise WorkbenchError("model config: rotary_scaling needs rotary positions (pos='rope')")
    if kind not in ROPE_SCALINGS:
        raise WorkbenchError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)}; the "
                             "workbench implements these exactly and refuses the rest)")
    missing = [k for k in ROPE_SCALINGS[kind] if not isinstance(scaling.get(k), (int, float))]
    extra = sorted(set(scaling) - {"rope_type", *ROPE_SCALINGS[kind]})
    if missing or extra:
        raise WorkbenchError(f"rope scaling {kind!r} needs exactly {', '.join(ROPE_SCALINGS[kind])}"
                             + (f"; missing {missing}" if missing else f"; unknown {extra}"))
    if scaling["factor"] <= 0 or (kind == "llama3" and not 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]):
        raise WorkbenchError(f"rope scaling {kind!r}: factor must be positive and low_freq_factor < high_freq_factor")


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
    # Likewise the ln2 of each Pre-norm block may feed the gated MLP's up path (W_in) through its own
    # module: removal can then freeze the up path's input long before the gate's (``--split-mlp``).
    split_ln2_up: bool = False
    # Architecture beyond GPT-2: pretrained families (Llama, Qwen2, GPT-NeoX) load into this same model,
    # each field a capability rather than a family name (see workbench/loader/).
    mlp: str = "gelu"  # "gelu": W_out·act(W_in x);  "swiglu": W_out·(act(W_gate x) ⊙ W_in x)
    pos: str = "learned"  # "learned" absolute embeddings, or "rope" (rotary on Q and K)
    rotary_dim: int | None = None  # rope: the leading dims of each head that rotate (None: all of them)
    rotary_base: float = 10000.0
    # Scaled rotary frequencies: {} (plain), {"rope_type": "linear", "factor": f} or {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+).
    rotary_scaling: dict[str, Any] = field(default_factory=dict)
    n_key_value_heads: int | None = None  # grouped-query attention; None: one K/V head per query head
    # Sliding-window attention: a query attends to the last W keys, itself included (None: to every
    # earlier key); in every layer (Mistral) or only in ``sliding_layers`` (Gemma: every other layer).
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    # The rotary base of the sliding layers, unscaled (Gemma 3's local layers); None: as every other layer.
    sliding_rotary_base: float | None = None
    # The divisor of the attention logits q·k (None: √d_head; Gemma: √query_pre_attn_scalar).
    attn_scale: float | None = None
    # tanh soft-caps c·tanh(x / c) on the attention logits and on the output logits (Gemma 2); None: none.
    attn_scores_soft_cap: float | None = None
    output_logits_soft_cap: float | None = None
    # A norm on queries and keys after their projection (None: none); a scheme may imply one (qk-norm).
    qk_norm: str | None = None
    parallel: bool = False  # GPT-NeoX: attention and MLP both read the block's input
    qkv_bias: bool = True  # False: b_Q, b_K, b_V are fixed zeros (buffers), never trained
    o_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = True
    family: str = "workbench"  # the checkpoint format it came from: the loader's adapter for export
    bos_token: str = "<|endoftext|>"  # prepended at position 0 by to_tokens (a document start, as in training)

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
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise WorkbenchError(f"model config: n_heads={self.n_heads} is not a multiple of "
                                 f"n_key_value_heads={self.n_key_value_heads}")
        self._check_attention()
        if self.mlp not in MLP_KINDS:
            raise WorkbenchError(f"unknown mlp {self.mlp!r}; choose one of: {', '.join(MLP_KINDS)}")
        if self.split_ln2_up and self.mlp != "swiglu":
            raise WorkbenchError("model config: split_ln2_up needs a gated MLP (mlp='swiglu'): only it has a "
                                 "separate up path")
        if self.pos not in POS_KINDS:
            raise WorkbenchError(f"unknown pos {self.pos!r}; choose one of: {', '.join(POS_KINDS)}")
        if self.act_fn not in ACT_FNS:
            raise WorkbenchError(f"unknown act_fn {self.act_fn!r}; choose one of: {', '.join(ACT_FNS)}")
        if self.pos == "rope":
            if self.rotary_dim is None:
                self.rotary_dim = self.d_head
            if not 0 < self.rotary_dim <= self.d_head or self.rotary_dim % 2:
                raise WorkbenchError(f"model config: rotary_dim={self.rotary_dim} must be even and in (0, d_head]")
        check_rotary_scaling(self.rotary_scaling, self.pos)
        from .norms import get_scheme  # late import: norms register themselves on import

        self.scheme = get_scheme(self.norm)
        self.scheme.check(self.norm_context)
        self._check_qk_norm()
        if self.parallel and not self.scheme.residual_is_sum(self.norm_context):
            raise WorkbenchError(f"parallel attention + MLP needs Pre-norm blocks; norm {self.norm!r} has Post-norm ones")

    def _check_attention(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise WorkbenchError(f"model config: sliding_window must be at least 1, got {self.sliding_window}")
        if self.sliding_layers is not None:
            layers = self.sliding_layers
            if self.sliding_window is None or not all(type(l) is int and 0 <= l < self.n_layers for l in layers) \
                    or len(set(layers)) != len(layers):
                raise WorkbenchError(f"model config: sliding_layers={layers!r} must be distinct layers in "
                                     f"[0, {self.n_layers}) of a model with a sliding_window")
        if self.sliding_rotary_base is not None and (self.sliding_window is None or self.pos != "rope"
                                                     or not self.sliding_rotary_base > 0):
            raise WorkbenchError("model config: sliding_rotary_base needs rotary positions, a sliding_window and a "
                                 f"positive base, got {self.sliding_rotary_base!r}")
        for name in ("attn_scale", "attn_scores_soft_cap", "output_logits_soft_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise WorkbenchError(f"model config: {name} must be positive (or None), got {value!r}")

    def sliding(self, layer: int) -> bool:
        """Whether block ``layer`` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    def _check_qk_norm(self) -> None:
        implied = self.scheme.qk_norm
        if implied is not None and self.qk_norm not in (None, implied):
            raise WorkbenchError(f"norm {self.norm!r} has QK-norm {implied!r}; qk_norm={self.qk_norm!r} contradicts it")
        self.qk_norm = self.qk_norm or implied
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise WorkbenchError(f"qk_norm {self.qk_norm!r} is not supported (supported: {', '.join(QK_NORMS)}: an "
                                 "RMSNorm over each head's query and key, or over the whole q and k projections)")

    @property
    def norm_context(self):
        """The part of the config a norm may read."""
        from .norms.registry import NormContext

        return NormContext(self.d_model, self.eps, self.n_layers, self.norm_kwargs)

    # --- attributes TransformerLens' ActivationCache reads -------------------------------------
    @property
    def normalization_type(self) -> str | None:
        return self.scheme.tl_normalization_type

    @property
    def final_rms(self) -> bool:
        return self.scheme.tl_normalization_type in ("RMS", "RMSPre")

    @property
    def positional_embedding_type(self) -> str:
        return "rotary" if self.pos == "rope" else "standard"

    @property
    def gated_mlp(self) -> bool:
        return self.mlp == "swiglu"

    @property
    def parallel_attn_mlp(self) -> bool:
        return self.parallel

    default_prepend_bos = True
    use_attn_result = False
    device = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise WorkbenchError(f"model config is a {type(d).__name__}, not a table of fields; the file is damaged "
                                 "(re-create the run)")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise WorkbenchError(f"model config has unknown fields {sorted(unknown)}; is it from a newer workbench?")
        for name, value in d.items():
            kinds = _JSON_TYPES.get(fields[name], (object,))
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise WorkbenchError(f"model config: {name} = {value!r} is not of type {fields[name]}; the file is "
                                     "damaged (re-create the run)")
        return cls(**d)
