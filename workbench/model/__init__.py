from .gpt import GPT, lm_cross_entropy

__all__ = ["GPT", "lm_cross_entropy"]
