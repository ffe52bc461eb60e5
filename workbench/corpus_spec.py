"""The one resolver of corpus specs: ``english`` (bundled), a ``.txt`` file, a folder of ``*.txt`` works
(``workbench.texts``), or a language mixture ``mix:eng=0.4,cyrl=0.3,…[;base=CORPUS]``
(``workbench.languages.mixture``, built from text corpora)."""

from __future__ import annotations

from .languages.mixture import mixture_corpus
from .texts import Corpus, load_text_corpus


def load_corpus(spec: str = "english") -> Corpus:
    return mixture_corpus(spec) if spec.startswith("mix:") else load_text_corpus(spec)
