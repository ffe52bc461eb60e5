"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved with every model."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import WorkbenchError

EOT = "<|endoftext|>"  # also used as BOS, as in GPT-2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on ``texts``; token 0 is ``<|endoftext|>``."""
    if vocab_size < 257 + 1:
        raise WorkbenchError(f"vocab size {vocab_size} is too small for byte-level BPE; use at least 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"tokenizer file {path} is missing; the run directory is incomplete (re-train it)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise WorkbenchError(f"tokenizer file {path} is corrupt ({e}); re-train the model") from None


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise WorkbenchError(f"tokenizer has no {EOT} token; it was not made by workbench")
    return i
