"""workbench: mechanistic interpretability of normalization in transformers."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .errors import WorkbenchError
from .model import GPT
from .norms import get_scheme, scheme_names
from .train import TrainConfig, __version__, train


def load(spec: str | Path, device: str = "cpu") -> GPT:
    """Load a model: a run directory written by ``workbench train`` (more sources in later releases)."""
    from .io import load_run

    return load_run(spec, device=device)


def norms() -> dict[str, str]:
    """Every registered normalization scheme with its one-line description."""
    return {name: get_scheme(name).description for name in scheme_names()}


__all__ = ["GPT", "ModelConfig", "TrainConfig", "WorkbenchError", "load", "norms", "train", "__version__"]
