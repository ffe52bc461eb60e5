"""Corpora: the bundled English works, a local text file or a folder of them.

Train/validation split by work (a whole book or play goes to one side), never by line, so the
validation loss measures generalization to unseen text, not memorized neighbouring lines. A validation
paragraph that also occurs in the training text (the Bible's parallel passages, a play's stage directions)
is dropped from validation: no training paragraph is ever scored as held out.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import WorkbenchError

BUNDLED = {"english": "english.jsonl.xz"}
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Work:
    title: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[Work]
    val: list[Work]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for w in split:
                h.update(w.title.encode())
                h.update(hashlib.sha256(w.text.encode()).digest())
            h.update(b"|")
        return h.hexdigest()[:16]


def bundled_path(filename: str) -> Path:
    return Path(str(resources.files("workbench") / "data" / filename))


def read_jsonl_xz(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hash(title: str) -> int:
    # A hash of the title, not the order, decides: adding a work never moves the others.
    return int(hashlib.sha256(title.encode()).hexdigest(), 16)


def _split(name: str, works: list[Work]) -> Corpus:
    works = [w for w in works if w.text.strip()]
    if not works:
        raise WorkbenchError(f"corpus {name!r} is empty: it holds no text; give a file or folder with text")
    if len(works) == 1:
        # A single work cannot be split by work: hold out its last 10% of paragraphs as one block.
        paras = works[0].text.split("\n\n")
        if len(paras) < 2:
            raise WorkbenchError(
                f"corpus {name!r} is one block of text without blank lines; cannot hold out validation "
                "text: separate paragraphs with blank lines or give several files"
            )
        cut = max(1, int(len(paras) * (1 - VAL_FRACTION)))
        t = works[0].title
        return _corpus(name, [Work(t, "\n\n".join(paras[:cut]))], [Work(t + " (held out)", "\n\n".join(paras[cut:]))])
    # Stratified by source, so every author or collection is represented in validation.
    train: list[Work] = []
    val: list[Work] = []
    for source in dict.fromkeys(w.source for w in works):
        group = [w for w in works if w.source == source]
        held = [w for w in group if _hash(w.title) % 1000 < VAL_FRACTION * 1000]
        if not held and len(group) > 1:
            held = [min(group, key=lambda w: _hash(w.title))]
        if len(held) == len(group) and len(group) > 1:
            held = held[:-1]
        val += held
        train += [w for w in group if w not in held]
    if not val:
        val, train = train[-1:], train[:-1]
    return _corpus(name, train, val)


def normalized(paragraph: str) -> str:
    """A paragraph's content for comparison: whitespace runs as one space, case folded."""
    return " ".join(paragraph.split()).casefold()


def unseen(train: list[Work], val: list[Work]) -> list[Work]:
    """``val`` without the paragraphs whose content (``normalized``) also occurs in ``train``; a work
    left without text is dropped."""
    seen = {normalized(p) for w in train for p in w.text.split("\n\n")}
    out = []
    for w in val:
        kept = [p for p in w.text.split("\n\n") if normalized(p) not in seen or not p.strip()]
        text = "\n\n".join(kept)
        if text.strip():
            out.append(Work(w.title, text, w.source))
    return out


def _corpus(name: str, train: list[Work], val: list[Work]) -> Corpus:
    val = unseen(train, val)
    if not val:
        raise WorkbenchError(f"corpus {name!r} has no validation text that its training text lacks (every held-out "
                             "paragraph also occurs in training); give more varied text or more files")
    return Corpus(name, train, val)


def load_text_corpus(spec: str = "english") -> Corpus:
    """``english`` (bundled), a ``.txt`` file, or a folder whose ``*.txt`` files are the works. Every
    corpus spec — mixtures included — goes through ``workbench.corpus_spec.load_corpus``."""
    if spec in BUNDLED:
        rows = read_jsonl_xz(bundled_path(BUNDLED[spec]))
        return _split(spec, [Work(f"{r['source']}/{r['title']}", r["text"], r["source"]) for r in rows])
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise WorkbenchError(f"corpus folder {path} has no *.txt files; put the text in .txt files")
        return _split(str(path), [Work(str(p.relative_to(path)), _read_text(p)) for p in files])
    if path.is_file():
        return _split(str(path), [Work(path.name, _read_text(path))])
    raise WorkbenchError(
        f"corpus {spec!r} not found: give one of {sorted(BUNDLED)}, a .txt file, a folder of .txt files "
        "or mix:LANG=SHARE,…"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkbenchError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
