"""Loading parallel corpora (``languages.aligned``): the bundled one, the Universal Declaration of Human
Rights in 508 declarations (PROVENANCE.md); a JSON Lines file of records shaped like it; or the held-out
parallel text of a mixture (``mix:…``, built by ``languages.mixture``).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from ..errors import WorkbenchError
from ..texts import bundled_path
from .aligned import ENGLISH, Language, ParallelCorpus
from .mixture import heldout_parallel


def _language(r: dict) -> Language:
    if "code" not in r:
        raise WorkbenchError("a parallel-corpus record has no `code`; every line needs code, name and articles")
    return Language(code=r["code"], name=r.get("name") or r["code"], iso639_3=r.get("iso639_3") or "",
                    script=r.get("script") or "", articles={str(k): v for k, v in (r.get("articles") or {}).items()},
                    paragraphs=tuple(r.get("paragraphs") or ()),
                    aligned_with_english=bool(r.get("aligned_with_english")), share=r.get("share"))


def load_parallel(spec: str | Path = "udhr") -> ParallelCorpus:
    """``udhr`` (bundled), ``mix:…`` (held-out parallel text of a synthetic mixture, see
    ``languages.mixture``) or a JSON Lines file (optionally .xz) of UDHR-shaped records."""
    s = str(spec)
    if s.startswith("mix:"):
        return heldout_parallel(s)
    path = bundled_path("udhr.jsonl.xz") if s == "udhr" else Path(s)
    if not path.is_file():
        raise WorkbenchError(f"parallel corpus {s!r} not found: give udhr, mix:LANG=SHARE,… or a .jsonl(.xz) file")
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise WorkbenchError(f"{path} is not UTF-8 JSON Lines ({e.__class__.__name__}); one record per line") from None
    languages = {}
    for r in rows:
        lang = _language(r)
        languages[lang.code] = lang
    if ENGLISH not in languages:
        raise WorkbenchError(f"parallel corpus {s!r} has no English (code {ENGLISH!r}) record; the Ranker compares "
                             "every language with English, so add the English original")
    return ParallelCorpus("udhr" if s == "udhr" else str(path), languages)
