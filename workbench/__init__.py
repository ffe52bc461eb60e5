"""workbench: mechanistic interpretability of normalization in transformers."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .errors import WorkbenchError
from .model import GPT
from .norms import get_scheme, scheme_names
from .train import TrainConfig, __version__, train


def load(spec: str | Path, device: str = "cpu"):
    """Load a model from a spec: a run directory written by ``workbench train`` (a ``GPT``), a GPT-2
    Hugging Face directory (also a ``GPT``: same logits as ``GPT2LMHeadModel``), or another Hugging Face model — ``smollm2``, a local HF directory, ``hf:NAME`` — seen through
    TransformerLens' TransformerBridge (a ``BridgedModel``)."""
    from .hf import is_hf_spec, load_hf, resolve_gpt2
    from .io import load_run
    from .removal.gpt2 import load_gpt2

    gpt2 = resolve_gpt2(spec)
    if gpt2 is not None:  # GPT-2 checkpoints load into the workbench's own family, exactly
        return load_gpt2(gpt2).to(device)
    if is_hf_spec(spec):
        return load_hf(spec)
    if not Path(spec).exists():
        raise WorkbenchError(
            f"unknown model spec {str(spec)!r} (not found): give a run directory, a Hugging Face directory, "
            "smollm2 or hf:NAME"
        )
    return load_run(spec, device=device)


def norms() -> dict[str, str]:
    """Every registered normalization scheme with its one-line description."""
    return {name: get_scheme(name).description for name in scheme_names()}


__all__ = ["GPT", "ModelConfig", "TrainConfig", "WorkbenchError", "load", "norms", "train", "__version__"]
