"""workbench: mechanistic interpretability of normalization in transformers."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .errors import WorkbenchError
from .model import GPT
from .norms import get_scheme, scheme_names
from .train import TrainConfig, train
from .version import __version__


def load(spec: str | Path, device: str = "cpu", n_ctx: int | None = None, download: bool = True) -> GPT:
    """The model of a spec — a run directory, a Hugging Face directory of a supported family (GPT-2,
    Llama/SmolLM2, Qwen2, Qwen3, Mistral, GPT-NeoX, Gemma 2/3, OLMo-2), ``smollm2`` or ``hf:NAME`` — as the
    workbench's hooked ``GPT``: one surface (``workbench.surface.HookedModel``) for every analysis.
    ``download=False``: read only, an ``hf:NAME`` must already be in the Hugging Face cache. See
    ``workbench.loader``."""
    from .loader import load as _load

    return _load(spec, device=device, n_ctx=n_ctx, download=download)


def norm_schemes() -> dict[str, str]:
    """Every registered normalization scheme with its one-line description."""
    return {name: get_scheme(name).description for name in scheme_names()}


__all__ = ["GPT", "ModelConfig", "TrainConfig", "WorkbenchError", "load", "norm_schemes", "train",
           "__version__"]
