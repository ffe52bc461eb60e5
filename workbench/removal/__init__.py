"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025), exact norm transforms, and
GPT-2 / Llama checkpoint interop.

* ``remove_ln(model, out, RemovalConfig(...))`` — workbench runs and GPT-2 directories;
  ``remove_rmsnorm_hf("smollm2", out, ...)`` — Llama-architecture Hugging Face models.
* ``convert(model, "folded" | "pre-rms" | "pre-crms")`` — exact, training-free.
* ``load_gpt2(dir)`` / ``export_gpt2(model, dir)`` — GPT-2 checkpoints in and out, LN-free included.
"""

from .api import convert_to_dir, remove_ln
from .convert import convert
from .finetune import RemovalConfig
from .gpt2 import export_gpt2, load_gpt2
from .gpt_sites import is_norm_free
from .llama import remove_rmsnorm_hf

__all__ = ["RemovalConfig", "convert", "convert_to_dir", "export_gpt2", "is_norm_free", "load_gpt2", "remove_ln",
           "remove_rmsnorm_hf"]
