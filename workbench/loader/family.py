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
    # Writes a workbench model of this family as a stock HF directory (None: the family has no exporter).
    export: Callable[["GPT", Path], dict] | None = None
    # Runs after loading (e.g. recognising our own LN-free export and folding it back).
    finish: Callable[["GPT", dict], "GPT"] | None = None
    # LayerNorm removal of this family's checkpoints: defaults for what the user did not set, and where
    # the LN-free model is written ("export": a stock directory of the family, "run": a workbench run).
    removal_defaults: dict[str, Any] = field(default_factory=dict)
    removal_output: str = "run"
    # Said in one line when removal is asked for and the family cannot take it (None: it can).
    removal_refusal: str | None = None


def read_back_ln_free(model: "GPT", hf_config: dict) -> "GPT":
    """``Family.finish`` of the families with an exporter: our own norm-free export becomes norm-free again."""
    from ..model.fold import as_norm_free

    return as_norm_free(model, model.cfg.eps) if hf_config.get(MARKER) else model
