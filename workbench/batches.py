"""Tokenized corpora and deterministic batches.

Every work is tokenized and the works are joined with <|endoftext|> into one token stream per split.
A training sequence is <|endoftext|> (as BOS) followed by n_ctx − 1 tokens from a random offset; the
offsets of step t depend only on (seed, t), so a resumed run sees exactly the batches it would have.
Tokenizer and token streams are cached by corpus fingerprint and vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer

from .corpus_spec import load_corpus
from .errors import WorkbenchError
from .texts import Corpus
from .tokenizer import eot_id, load_tokenizer, train_tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))


@dataclass
class TokenData:
    corpus: str
    tokenizer: Tokenizer
    train: np.ndarray  # uint16/uint32 token stream
    val: np.ndarray

    @property
    def bos(self) -> int:
        return eot_id(self.tokenizer)

    def check_context(self, n_ctx: int) -> None:
        for name, stream in (("training", self.train), ("validation", self.val)):
            if len(stream) < n_ctx:
                raise WorkbenchError(
                    f"the {name} split of corpus {self.corpus!r} has {len(stream)} tokens, fewer than one "
                    f"context of {n_ctx}; use a larger corpus or a smaller --n-ctx"
                )

    def _windows(self, stream: np.ndarray, offsets: np.ndarray, n_ctx: int) -> torch.Tensor:
        idx = offsets[:, None] + np.arange(n_ctx - 1)[None, :]
        body = torch.from_numpy(stream[idx].astype(np.int64))
        return torch.cat([torch.full((len(offsets), 1), self.bos, dtype=torch.long), body], dim=1)

    def train_batch(self, step: int, batch_size: int, n_ctx: int, seed: int) -> torch.Tensor:
        """The global batch of training step ``step``: a pure function of (seed, step)."""
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        offsets = rng.integers(0, len(self.train) - (n_ctx - 1) + 1, size=batch_size)
        return self._windows(self.train, offsets, n_ctx)

    def val_batches(self, n_batches: int, batch_size: int, n_ctx: int) -> list[torch.Tensor]:
        """Fixed validation windows spread evenly over the whole validation stream."""
        n = n_batches * batch_size
        last = len(self.val) - (n_ctx - 1)
        offsets = np.linspace(0, last, num=n).astype(np.int64)
        return [self._windows(self.val, offsets[i : i + batch_size], n_ctx) for i in range(0, n, batch_size)]

    def train_counts(self, vocab_size: int | None = None) -> np.ndarray:
        """How often each id occurs in the training split (``vocab_size`` entries, default the tokenizer's)."""
        return np.bincount(self.train, minlength=vocab_size or self.tokenizer.get_vocab_size()).astype(np.int64)

    def unigram_cross_entropy(self) -> float:
        """Validation CE (nats/token) of the add-one-smoothed training unigram: the no-context baseline."""
        counts = self.train_counts().astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[self.val].mean())


def batch_fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of a batch of token ids (values and shape): two runs with equal fingerprints at every
    step trained on the same data."""
    h = hashlib.sha256(str(tuple(tokens.shape)).encode())
    h.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def batches_digest(fingerprints: list[str | None]) -> str | None:
    """One hash of a run's per-step batch fingerprints, in step order; None if any step lacks one."""
    if not fingerprints or any(f is None for f in fingerprints):
        return None
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:16]


def tokenize_works(tok: Tokenizer, works) -> np.ndarray:
    """Token stream of ``works`` joined by <|endoftext|>."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch([w.text for w in works]):
        ids.extend(enc.ids)
        ids.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
    return np.asarray(ids, dtype=dtype)


def load_token_data(corpus: str | Corpus, vocab_size: int, tokenizer: Tokenizer | None = None) -> TokenData:
    """Tokenize ``corpus`` (training a BPE of ``vocab_size`` on its training split unless given one)."""
    c = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if tokenizer is not None:
        return TokenData(c.name, tokenizer, tokenize_works(tokenizer, c.train), tokenize_works(tokenizer, c.val))
    key = hashlib.sha256(f"{c.fingerprint()}|{vocab_size}|{tokenizers.__version__}".encode()).hexdigest()[:20]
    d = cache_dir() / "tokenized" / key
    if (d / "done").is_file():
        try:
            return TokenData(c.name, load_tokenizer(d / "tokenizer.json"), np.load(d / "train.npy"), np.load(d / "val.npy"))
        except (OSError, ValueError, WorkbenchError):
            shutil.rmtree(d, ignore_errors=True)  # a damaged cache entry is rebuilt, not trusted
    tok = train_tokenizer((w.text for w in c.train), vocab_size)
    data = TokenData(c.name, tok, tokenize_works(tok, c.train), tokenize_works(tok, c.val))
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{key}-"))
        tok.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "train.npy", data.train)
        np.save(tmp / "val.npy", data.val)
        (tmp / "done").write_text("ok")
        try:
            os.replace(tmp, d)
        except OSError:  # another process filled the cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # caching is an optimization; an unwritable cache dir must not stop training
    return data


__all__ = ["TokenData", "batch_fingerprint", "batches_digest", "cache_dir", "load_token_data", "tokenize_works"]
