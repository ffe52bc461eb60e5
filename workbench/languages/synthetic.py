"""Synthetic languages: deterministic, invertible transformations of English text.

Every synthetic language is exactly parallel to English, so its share of a training mixture can be set
at will and its held-out text aligned unit by unit. A language is a ``+``-joined list of transforms;
their order in the name does not matter: they are always applied as word order → vocabulary → script,
and inverted in the opposite order.

- script substitution (``cyrl``, ``grek``, ``armn``, ``geor``, ``glag``, ``cher``): every ASCII letter
  becomes a letter of another Unicode script, case kept — a new alphabet, the same words;
- vocabulary permutation (``perm1``, ``perm2``, …): every English word type is replaced by another word
  type of the same length, by a fixed seeded permutation — the same alphabet, new words;
- reversed word order (``rev``): the words of every line in reverse order — new syntax.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import WorkbenchError

# Per script: the code points that A–Z and a–z become (26 letters each, both cases).
_SCRIPTS: dict[str, tuple[list[int], list[int]]] = {}


def _letters(upper: list[int], lower: list[int]) -> tuple[list[int], list[int]]:
    assert len(upper) >= 26 and len(lower) >= 26
    return upper[:26], lower[:26]


_SCRIPTS["cyrl"] = _letters(list(range(0x0410, 0x0430)), list(range(0x0430, 0x0450)))
# Greek has 24 letters: add the archaic digamma and koppa; U+03A2 is unassigned (no capital final sigma).
_SCRIPTS["grek"] = _letters([c for c in range(0x0391, 0x03AA) if c != 0x03A2] + [0x03DC, 0x03DE],
                            [c for c in range(0x03B1, 0x03CA) if c != 0x03C2] + [0x03DD, 0x03DF])
_SCRIPTS["armn"] = _letters(list(range(0x0531, 0x0557)), list(range(0x0561, 0x0587)))
_SCRIPTS["geor"] = _letters(list(range(0x1C90, 0x1CBB)), list(range(0x10D0, 0x10FB)))  # Mtavruli / Mkhedruli
_SCRIPTS["glag"] = _letters(list(range(0x2C00, 0x2C2F)), list(range(0x2C30, 0x2C5F)))
_SCRIPTS["cher"] = _letters(list(range(0x13A0, 0x13F0)), list(range(0xAB70, 0xABC0)))
SCRIPT_NAMES = {"cyrl": "Cyrillic", "grek": "Greek", "armn": "Armenian", "geor": "Georgian",
                "glag": "Glagolitic", "cher": "Cherokee"}

_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Transform:
    name: str
    order: int  # 0 word order, 1 vocabulary, 2 script: the fixed order of application
    forward: Callable[[str], str]
    inverse: Callable[[str], str]


def _script(code: str) -> Transform:
    upper, lower = _SCRIPTS[code]
    fwd = {ord("A") + i: upper[i] for i in range(26)} | {ord("a") + i: lower[i] for i in range(26)}
    inv = {v: k for k, v in fwd.items()}
    return Transform(code, 2, lambda s: s.translate(fwd), lambda s: s.translate(inv))


@functools.lru_cache(maxsize=1)
def english_vocabulary() -> tuple[str, ...]:
    """Every lower-cased ASCII word type of the bundled English corpus, sorted (deterministic)."""
    from ..texts import bundled_path, read_jsonl_xz

    words: set[str] = set()
    for r in read_jsonl_xz(bundled_path("english.jsonl.xz")):
        words.update(w.lower() for w in _WORD.findall(r["text"]))
    return tuple(sorted(words))


@functools.lru_cache(maxsize=16)
def _permutation(seed: int) -> tuple[dict[str, str], dict[str, str]]:
    by_len: dict[int, list[str]] = {}
    for w in english_vocabulary():
        by_len.setdefault(len(w), []).append(w)
    rng = np.random.Generator(np.random.PCG64(seed))
    fwd: dict[str, str] = {}
    for n in sorted(by_len):  # same length, so case shapes and byte counts survive the swap
        group = by_len[n]
        fwd.update(zip(group, (group[i] for i in rng.permutation(len(group)))))
    return fwd, {v: k for k, v in fwd.items()}


def _recase(shape_of: str, word: str) -> str | None:
    if shape_of.islower():
        return word
    if len(shape_of) > 1 and shape_of.isupper():
        return word.upper()
    if shape_of[0].isupper() and (len(shape_of) == 1 or shape_of[1:].islower()):
        return word.capitalize()
    return None  # mixed case (e.g. "McDonald"): left as it is, both ways


def _map_words(table: dict[str, str]) -> Callable[[str], str]:
    def sub(m: re.Match) -> str:
        w = m.group(0)
        target = table.get(w.lower())
        if target is None:
            return w
        return _recase(w, target) or w
    return lambda s: _WORD.sub(sub, s)


def _perm(seed: int) -> Transform:
    fwd, inv = _permutation(seed)
    return Transform(f"perm{seed}", 1, _map_words(fwd), _map_words(inv))


def _reverse_words(s: str) -> str:
    return "\n".join("".join(reversed(re.split(r"([ \t]+)", line))) for line in s.split("\n"))


def _transform(token: str) -> Transform:
    if token in _SCRIPTS:
        return _script(token)
    if token == "rev":
        return Transform("rev", 0, _reverse_words, _reverse_words)
    m = re.fullmatch(r"perm([1-9][0-9]{0,3})", token)
    if m:
        return _perm(int(m.group(1)))
    raise WorkbenchError(f"unknown synthetic-language transform {token!r}: use a script ({', '.join(_SCRIPTS)}), "
                         "permN (vocabulary permutation with seed N) or rev (reversed word order), joined by +")


@dataclass(frozen=True)
class SyntheticLanguage:
    """``name`` such as ``cyrl``, ``perm3`` or ``rev+perm3``: English seen through its transforms."""

    name: str

    @functools.cached_property
    def transforms(self) -> tuple[Transform, ...]:
        ts = sorted((_transform(t) for t in self.name.split("+")), key=lambda t: t.order)
        orders = [t.order for t in ts]
        if len(set(orders)) != len(orders):
            raise WorkbenchError(f"synthetic language {self.name!r} combines two transforms of one kind; "
                                 "use at most one script, one permN and one rev")
        return tuple(ts)

    @property
    def family(self) -> str:
        kinds = {0: "reverse", 1: "vocabulary", 2: "script"}
        return "+".join(kinds[t.order] for t in self.transforms)

    @property
    def description(self) -> str:
        parts = {0: "reversed word order", 1: "permuted vocabulary"}
        return ", ".join(SCRIPT_NAMES[t.name] + " letters" if t.order == 2 else
                         parts[t.order] + (f" (seed {t.name[4:]})" if t.order == 1 else "") for t in self.transforms)

    def __call__(self, text: str) -> str:
        for t in self.transforms:
            text = t.forward(text)
        return text

    def invert(self, text: str) -> str:
        for t in reversed(self.transforms):
            text = t.inverse(text)
        return text


def is_synthetic(name: str) -> bool:
    """Made only of known transforms (whether they combine is checked by ``SyntheticLanguage``)."""
    try:
        for token in name.split("+"):
            _transform(token)
    except WorkbenchError:
        return False
    return True


# The controlled experiment's families: six languages each, one transformation kind per family.
FAMILIES: dict[str, tuple[str, ...]] = {
    "script": ("cyrl", "grek", "armn", "geor", "glag", "cher"),
    "vocabulary": tuple(f"perm{i}" for i in range(1, 7)),
    "reverse": tuple(f"rev+perm{i}" for i in range(11, 17)),
}
