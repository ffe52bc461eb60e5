"""Training mixtures whose language shares we set: ``mix:eng=0.4,cyrl=0.3,perm2=0.2,PATH=0.1``.

Each language is English itself (``eng``), a synthetic language built from English (``cyrl``,
``perm3``, ``rev+perm12``, … — see ``languages.synthetic``) or a monolingual corpus the user brings (a
``.txt`` file or a folder of them). Shares are fractions of the mixture's characters and must sum to 1.

The English training text is cut into paragraphs and every paragraph goes to exactly one language:
languages never see the same content, as in a real multilingual corpus. The paragraphs are put in a
fixed pseudo-random order (a hash of their position) and each language takes a run of consecutive
paragraphs holding its share of the characters, so a share is realised to within about one paragraph
(drawing each paragraph's language independently missed a 0.02 share by 9 %). ``…;base=CORPUS``
builds the languages from another English corpus (a .txt file or folder) instead of the bundled one.
A user corpus contributes ``share × (English training characters)`` of its own training text. The
validation split is mixed the same way. Held-out *parallel* text — the same validation
paragraphs in every built language — is what the Language Ranker evaluates on (``heldout_parallel``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import WorkbenchError
from ..texts import Corpus, Work, load_text_corpus, unseen
from .aligned import ENGLISH, Language, ParallelCorpus
from .synthetic import SyntheticLanguage, is_synthetic

HELDOUT_UNITS = 60
MIN_HELDOUT_UNITS = 5
HELDOUT_CHARS = (80, 300)  # sentence-to-paragraph units that fit a tiny model's context


@dataclass(frozen=True)
class Component:
    name: str
    share: float
    path: Path | None = None  # a user corpus

    @property
    def built(self) -> bool:
        return self.path is None

    def transform(self, text: str) -> str:
        return text if self.name == ENGLISH else SyntheticLanguage(self.name)(text)


def split_base(spec: str) -> tuple[str, str]:
    """``mix:…;base=CORPUS`` builds the languages from another English corpus (default the bundled one)."""
    body, _, base = spec.partition(";base=")
    return body, base or "english"


def parse_mixture(spec: str) -> list[Component]:
    body = split_base(spec)[0]
    body = body[4:] if body.startswith("mix:") else body
    comps: list[Component] = []
    for item in filter(None, (s.strip() for s in body.split(","))):
        name, eq, share_s = item.rpartition("=")
        if not eq or not name:
            raise WorkbenchError(f"mixture entry {item!r} is not NAME=SHARE; write e.g. mix:eng=0.5,cyrl=0.5")
        try:
            share = float(share_s)
        except ValueError:
            raise WorkbenchError(f"share {share_s!r} of {name!r} is not a number; write e.g. {name}=0.25") from None
        if not 0 < share <= 1 or not math.isfinite(share):
            raise WorkbenchError(f"share of {name!r} is {share}; every share must be in (0, 1]")
        if name == ENGLISH or is_synthetic(name):
            if name != ENGLISH:
                SyntheticLanguage(name).transforms  # noqa: B018  (raises on an impossible combination)
            comps.append(Component(name, share))
        elif Path(name).exists():
            comps.append(Component(Path(name).name, share, Path(name)))
        else:
            raise WorkbenchError(f"unknown mixture language {name!r}: give eng, a synthetic language (cyrl, perm3, "
                                 "rev+perm3, …) or the path of a .txt file or folder")
    if not comps:
        raise WorkbenchError("empty mixture; write e.g. mix:eng=0.5,cyrl=0.5")
    names = [c.name for c in comps]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"mixture names a language twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                             "give each once")
    total = sum(c.share for c in comps)
    if abs(total - 1) > 1e-6:
        raise WorkbenchError(f"mixture shares sum to {total:.6g}, not 1; adjust them so they add up to 1")
    return comps


def _u(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _assign(works: list[Work], comps: list[Component], split: str) -> dict[str, list[Work]]:
    """Every paragraph of ``works`` to one component (user corpora's run of paragraphs is dropped: their
    own text stands in for it)."""
    paras = [(n, i, p) for n, w in enumerate(works) for i, p in enumerate(w.text.split("\n\n"))]
    order = sorted(range(len(paras)), key=lambda k: _u(f"{split}|{works[paras[k][0]].title}|{paras[k][1]}"))
    size = [len(p) + 2 for _, _, p in paras]  # + the blank line that joins it to the next
    total = sum(size)
    bounds, acc = [], 0.0
    for c in comps:
        acc += c.share
        bounds.append(acc)
    which, done = {}, 0
    for k in order:
        middle = (done + size[k] / 2) / total  # the language whose stretch of characters holds its middle
        done += size[k]
        which[k] = comps[next((j for j, b in enumerate(bounds) if middle < b), len(comps) - 1)]
    parts: dict[tuple[int, str], list[str]] = {}
    for k, (n, _, para) in enumerate(paras):
        if which[k].built:
            parts.setdefault((n, which[k].name), []).append(which[k].transform(para))
    out: dict[str, list[Work]] = {c.name: [] for c in comps if c.built}
    for (n, name), texts in parts.items():
        out[name].append(Work(f"{name}/{works[n].title}", "\n\n".join(texts), name))
    return out


def _take(works: list[Work], chars: int, name: str, what: str) -> list[Work]:
    out, n = [], 0
    for w in works:
        if n >= chars:
            break
        text = w.text[: chars - n]
        out.append(Work(f"{name}/{w.title}", text, name))
        n += len(text)
    if n < chars:
        raise WorkbenchError(f"corpus {name!r} has {n} characters of {what} text, fewer than its share needs "
                             f"({chars}); lower its share or bring more text")
    return out


def mixture_corpus(spec: str) -> Corpus:
    comps = parse_mixture(spec)
    english = load_text_corpus(split_base(spec)[1])
    train = _assign(english.train, comps, "train")
    val = _assign(english.val, comps, "val")
    n_train = sum(len(w.text) for w in english.train)
    n_val = sum(len(w.text) for w in english.val)
    tr = [w for ws in train.values() for w in ws]
    va = [w for ws in val.values() for w in ws]
    for c in comps:
        if not c.built:
            user = load_text_corpus(str(c.path))
            tr += _take(user.train, round(c.share * n_train), c.name, "training")
            va += _take(user.val, max(1, round(c.share * n_val)), c.name, "validation")
    return Corpus(spec, tr, unseen(tr, va))  # a user corpus may repeat what the others train on


def heldout_parallel(spec: str, n_units: int = HELDOUT_UNITS) -> ParallelCorpus:
    """The English validation paragraphs of about an article's length, in every built language of the
    mixture — text no model trained on the mixture has seen. User corpora have no parallel text and are
    left out."""
    comps = parse_mixture(spec)
    english = load_text_corpus(split_base(spec)[1])
    lo, hi = HELDOUT_CHARS
    paras = [p for w in sorted(english.val, key=lambda w: w.title) for p in w.text.split("\n\n")
             if lo <= len(p) <= hi]
    if len(paras) < MIN_HELDOUT_UNITS:
        raise WorkbenchError(f"the validation split of {split_base(spec)[1]!r} has {len(paras)} paragraphs of "
                             f"{lo}-{hi} characters, fewer than {MIN_HELDOUT_UNITS}; give a larger base corpus")
    n_units = min(n_units, len(paras))
    step = len(paras) / n_units  # spread over every validation work, not the first one only
    units = [paras[int(i * step)] for i in range(n_units)]
    langs = {ENGLISH: Language(ENGLISH, "English", ENGLISH, "Latn",
                               {str(i + 1): u for i, u in enumerate(units)},
                               share=next((c.share for c in comps if c.name == ENGLISH), 0.0))}
    for c in comps:
        if c.built and c.name != ENGLISH:
            lang = SyntheticLanguage(c.name)
            langs[c.name] = Language(c.name, lang.description, articles={str(i + 1): lang(u) for i, u in enumerate(units)},
                                     family=lang.family, share=c.share)
    return ParallelCorpus(spec, langs)
