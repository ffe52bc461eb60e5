"""What a model family adapter is: the only place where one checkpoint format differs from another.

An adapter maps a Hugging Face config to a ``ModelConfig`` (capabilities, not names: RMSNorm or
LayerNorm, GELU or SwiGLU, learned or rotary positions, grouped-query attention, parallel blocks,
which biases exist) and the checkpoint's weights to the workbench's layout; optionally it writes a
workbench model back as a stock directory of its family. Everything downstream — hooks, caches, DLA,
patching, diagnostics, LayerNorm removal — reads only the resulting ``GPT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

# Our exports of norm-free models keep the family's norm modules as identities made of a huge ε
# (gain 1/√ε) and say so in their config; reading such a directory back folds them away again.
LN_FREE_EPS = 1e15
MARKER = "workbench_ln_free"

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..model import GPT


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this adapter reads
    # HF config dict → ModelConfig keyword arguments; raises WorkbenchError for what it cannot represent.
    config: Callable[[dict], dict[str, Any]]
    # HF state dict (+ the ModelConfig built above) → state dict in the workbench's names and layout.
    weights: Callable[[dict[str, Tensor], "ModelConfig", dict], dict[str, Tensor]]
    # Writes a workbench model of this family as a stock HF directory, checked on the given tokens (None:
    # fixed random ones) by ``verify_export`` (None: the family has no exporter).
    export: Callable[["GPT", Path, Tensor | None], dict] | None = None
    # Runs after loading (e.g. recognising our own LN-free export and folding it back).
    finish: Callable[["GPT", dict], "GPT"] | None = None
    # LayerNorm removal of this family's checkpoints: defaults for what the user did not set, and where
    # the LN-free model is written ("export": a stock directory of the family, "run": a workbench run).
    removal_defaults: dict[str, Any] = field(default_factory=dict)
    removal_output: str = "run"
    # Said in one line when removal is asked for and the family cannot take it (None: it can).
    removal_refusal: str | None = None


def stock_attention(cfg: "ModelConfig") -> bool:
    """Whether the attention and the logits are as GPT-2, Llama and Qwen2 compute them: every earlier key,
    logits scaled by 1/√d_head, no soft-caps (what their exporters can write)."""
    return (cfg.sliding_window is None and cfg.attn_scale is None and cfg.attn_scores_soft_cap is None
            and cfg.output_logits_soft_cap is None)


def read_back_ln_free(model: "GPT", hf_config: dict) -> "GPT":
    """``Family.finish`` of the families with an exporter: our own norm-free export becomes norm-free again."""
    from ..model.fold import as_norm_free

    return as_norm_free(model, model.cfg.eps) if hf_config.get(MARKER) else model


# An export must reproduce the model it was written from: the stock reload's logits may differ from the
# workbench model's by at most this fraction of the logit scale (float32 round-off, and the identity norms
# of norm-free exports, cost ≤ 3e-5 on the tested models; docs/ln_removal.md).
EXPORT_TOLERANCE = 1e-4


def check_tokens(model: "GPT", tokens: Tensor | None = None) -> Tensor:
    """The tokens an export is checked on: ``tokens`` when given, else two fixed random windows (behind a
    sink prefix, position 0 holds its token)."""
    import torch

    if tokens is not None:
        return tokens.cpu()
    return torch.randint(0, model.cfg.d_vocab, (2, min(model.cfg.n_ctx, 64)), generator=torch.Generator().manual_seed(0))


def verify_export(model: "GPT", directory: Path, tokens: Tensor | None = None) -> float:
    """Read ``directory`` back with transformers' own classes and compare its logits with ``model``'s on
    fixed tokens; returns the largest difference. Refuses (``WorkbenchError``) where the difference is
    above ``EXPORT_TOLERANCE`` of the logit scale, or where one side overflows and the other does not:
    the written directory is then not this model. Positions where the model itself overflows are not
    compared (an overflowing norm-free model still exports; ``workbench dla`` names such prompts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..errors import WorkbenchError
    from ..model import sink

    t = check_tokens(model, tokens)
    stock = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prefix = sink.read_beside(directory)
    if prefix is not None:
        t = torch.cat([torch.full_like(t[:, :1], prefix.token), t[:, 1:]], dim=1)
    with torch.no_grad():
        ours, ref = model.cpu()(t).float(), sink.stock_forward(stock, directory)(t).float()
    finite = torch.isfinite(ours)
    if not finite.any():
        raise WorkbenchError("the model's logits are not finite on the export check tokens, so the export cannot "
                             "be checked; nothing was written")
    diff = (ours[finite] - ref[finite]).abs().max().item() if torch.isfinite(ref[finite]).all() else float("inf")
    scale = ours[finite].abs().max().item()
    if not diff <= EXPORT_TOLERANCE * max(scale, 1e-30) or not torch.equal(torch.isfinite(ref), finite):
        raise WorkbenchError(
            f"the exported {type(stock).__name__} does not reproduce this model (its logits, read back by "
            f"transformers, differ by {diff:.3g} = {diff / max(scale, 1e-30):.2g} of the logit scale; tolerance "
            f"{EXPORT_TOLERANCE:g}): the model has something that format cannot represent; nothing was written")
    return diff


def stock_norm_weight(ln_free: bool, eps: float) -> Callable[[Any, int], Tensor]:
    """``norm_weight(norm, width)`` for an exporter: the norm's gain, or for a norm-free model the gain √ε
    that makes a stock RMSNorm with ε = ``eps`` (1e15) the identity on any residual far below √ε."""
    import torch

    gain = float(torch.tensor(eps, dtype=torch.float32).sqrt())

    def norm_weight(norm, width: int) -> Tensor:
        if ln_free:
            return torch.full((width,), gain)
        w = getattr(norm.affine, "w", None)
        return w.detach() if w is not None else torch.ones(width)

    return norm_weight


def write_stock(model: "GPT", hf_cfg, cls, sd: dict[str, Tensor], out: Path, check_tokens: Tensor | None = None) -> dict:
    """Build ``cls(hf_cfg)`` from ``sd`` (every tensor it has, nothing else), save it with the model's tokenizer
    atomically to ``out``, read it back with transformers and compare (``verify_export``); the export report."""
    from transformers import PreTrainedTokenizerFast

    from ..io import atomic_dir

    ln_free = model.cfg.scheme.stock == "identity"
    if ln_free:
        setattr(hf_cfg, MARKER, True)
    hf = cls(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict({k: v.detach().float().contiguous().cpu() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{cls.__name__} export mismatch: missing {missing}, unexpected {unexpected}")
    from ..model import sink

    tok, bos = model.tokenizer, model.cfg.bos_token
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        if tok is not None:
            PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos).save_pretrained(tmp)
        prefix = sink.prefix_of(model)
        if prefix is not None:  # position 0 as a fixed key/value prefix beside the stock files
            sink.save(prefix, tmp / sink.SINK_FILE)
        diff = verify_export(model, tmp, check_tokens)
    return {"max_abs_logit_diff": diff, "ln_free": ln_free, "rms_norm_eps": hf_cfg.rms_norm_eps,
            "architecture": cls.__name__}
