"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025), exact norm transforms, and
GPT-2 / Llama checkpoint interop."""

from .api import remove_ln
from .finetune import RemovalConfig
from .gpt_sites import is_norm_free

__all__ = ["RemovalConfig", "is_norm_free", "remove_ln"]
