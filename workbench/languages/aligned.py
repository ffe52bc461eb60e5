"""Aligned text: a ``Language``'s units keyed by their position in the English original, and a
``ParallelCorpus`` of languages aligned unit by unit with English. Read by ``languages.parallel`` (the
bundled UDHR, a JSON Lines file) and built by ``languages.mixture`` (held-out text of a mixture).

Two alignments: by **article** (30 units, every declaration) and by **paragraph** (the 50 article
paragraphs, ``paragraphs[10:]``, for the 76 declarations of the UDHR marked ``aligned_with_english``; the preamble
is left out because its last sentence is split at different places in different languages).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import WorkbenchError

ENGLISH = "eng"
UNITS = ("article", "paragraph")
PREAMBLE_UNITS = 10  # paragraphs[:10] are the preamble (see PROVENANCE.md)


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    iso639_3: str = ""
    script: str = ""
    articles: dict[str, str] = field(default_factory=dict)
    paragraphs: tuple[str, ...] = ()
    aligned_with_english: bool = False
    family: str = ""  # synthetic languages: which transformation family
    share: float | None = None  # training share, for languages of a mixture we built

    def units(self, unit: str) -> dict[str, str]:
        """This language's units keyed by their position in the English original."""
        if unit == "article":
            return {k: v for k, v in self.articles.items() if v.strip()}
        if not self.aligned_with_english:
            return {}
        return {f"p{i}": t for i, t in enumerate(self.paragraphs[PREAMBLE_UNITS:]) if t.strip()}


@dataclass(frozen=True)
class ParallelCorpus:
    name: str
    languages: dict[str, Language]

    @property
    def english(self) -> Language:
        return self.languages[ENGLISH]

    def resolve(self, codes: list[str] | None, unit: str) -> list[Language]:
        """The languages named by corpus code or unambiguous ISO 639-3 code (default: all with units
        aligned to English), English excluded unless asked for."""
        if unit not in UNITS:
            raise WorkbenchError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
        if codes is None:
            out = [lang for c, lang in self.languages.items() if c != ENGLISH and lang.units(unit)]
            if not out:
                raise WorkbenchError(f"corpus {self.name!r} has no language besides English with {unit} units "
                                     "aligned to it; give a corpus with other languages")
            return out
        if not codes:
            raise WorkbenchError("no language named; give --langs as comma-separated codes, e.g. fra,deu")
        by_iso: dict[str, list[str]] = {}
        for c, lang in self.languages.items():
            by_iso.setdefault(lang.iso639_3, []).append(c)
        out = []
        for code in dict.fromkeys(codes):
            if code in self.languages:
                out.append(self.languages[code])
            elif len(by_iso.get(code, [])) == 1:
                out.append(self.languages[by_iso[code][0]])
            elif code in by_iso:
                raise WorkbenchError(f"language {code!r} is ambiguous in corpus {self.name!r}: it is ISO 639-3 for "
                                     f"{', '.join(by_iso[code])}; give one of those codes")
            else:
                raise WorkbenchError(f"language {code!r} is not in corpus {self.name!r}; codes are the corpus' "
                                     f"`code` field (e.g. {', '.join(list(self.languages)[:4])}) or ISO 639-3")
        for lang in out:
            if not lang.units(unit):
                hint = " (paragraph alignment exists only for declarations marked aligned_with_english)" \
                    if unit == "paragraph" else ""
                raise WorkbenchError(f"language {lang.code!r} has no {unit} units aligned with English{hint}; "
                                     "use --unit article or drop it")
        return out

    def pairs(self, lang: Language, unit: str) -> list[tuple[str, str, str]]:
        """``(key, english_text, text)`` for every unit both have, in English order."""
        eng, other = self.english.units(unit), lang.units(unit)
        return [(k, e, other[k]) for k, e in eng.items() if k in other]
