"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025) and exact norm transforms.

* ``remove_ln(model, out, RemovalConfig.of(...))`` — any model ``workbench.load`` takes whose norms are
  Pre-norm LayerNorm/RMSNorm: workbench runs, GPT-2, Llama/SmolLM2, Qwen2, GPT-NeoX. One orchestrator
  over one removal adapter (``gpt_sites.GPTRemoval``); the family adapter (``workbench.loader``) says
  where the LN-free model goes (a stock directory of its family, or a workbench run).
  The method is parts (``method.py``: schedule, calibration, hand-over, losses, optimization, runtime);
  named recipes pick them by capability (``recipes.py``).
* ``convert(model, "folded" | "pre-rms" | "pre-crms")`` — exact, training-free.
"""

from ..model.fold import is_norm_free
from .api import convert_to_dir, remove_ln
from .convert import convert
from .method import RemovalConfig

__all__ = ["RemovalConfig", "convert", "convert_to_dir", "is_norm_free", "remove_ln"]
