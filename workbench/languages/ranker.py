"""Language Ranker (Li et al. 2024) on parallel text, with an independent measure beside it.

For each language X and every unit (article or paragraph) it shares with English, the English text and
the X text are run separately; at every layer the pooled residual streams are compared by cosine
similarity, and the similarities are averaged over the aligned units: ``per_layer[ℓ]``. The **score** is
the mean of ``per_layer`` over all layers — the area under the per-layer curve, so no layer has to be
picked in advance (models differ in where the cross-lingual layers sit); the curve is kept for that.

**Bits per English byte** measures how well the model handles X without looking inside it: the total
NLL of X's units, in bits, divided by the UTF-8 bytes of the same units' English text. The texts say the
same thing, so this compares languages on equal content; plain bits per byte of X's own text does not
(a Devanagari letter is 3 bytes, a Cyrillic one 2, a Latin one 1). Texts longer than the context are
scored with strided windows (every token once, with at least half a window of context); their
representation comes from their first ``max_tokens`` tokens (``n_truncated`` counts them).

``score_ci95``: a 95 % percentile-bootstrap interval of the score over the units (200 resamples,
centering redone for each), so that languages whose intervals overlap are not read as ranked.

**Retrieval** (``metric="retrieval"|"both"``; MEXA): the share of units whose own translation is the
strict maximum of its row and column of the similarity matrix, per layer (``retrieval_per_layer``),
averaged over layers (``retrieval``; ``retrieval_max`` the best layer); its interval bootstraps the
per-unit hit rates. See ``languages.alignment``. Confounds beside every score: ``token_ratio`` (the
language's tokens over English tokens on the same units) and ``script``; the top level has each score's
Spearman with bits per English byte and its partial Spearman controlling for the token ratio.
``length_match``: every unit and its English original are represented by their first
min(tokens of X, tokens of English) tokens (from the same pass: attention is causal), so text length
cannot separate languages; bits per English byte still read the whole texts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import WorkbenchError
from .aligned import UNITS, Language, ParallelCorpus
from .alignment import (cosine, cosine_interval, mean_interval, partial_spearman, retrieval_hits, spearman,
                        spearman_interval)
from .encode import POOLINGS, Encoded, TextModel, encode_texts, text_model
from .parallel import load_parallel

PAIRINGS = ("aligned", "shuffled")
CENTERINGS = ("language", "none")
METRICS = ("cosine", "retrieval", "both")
__all__ = ["rank_languages", "encode_languages", "score_languages", "ranking_table", "layer_table", "spearman",
           "partial_spearman", "check_options", "check_units", "PAIRINGS", "CENTERINGS", "METRICS", "POOLINGS"]


def _unit_keys(corpus: ParallelCorpus, unit: str, max_units: int | None) -> list[str]:
    eng = corpus.english.units(unit)
    if not eng:
        raise WorkbenchError(f"the English text of {corpus.name!r} has no {unit} units")
    keys = list(eng)
    if max_units is not None:
        if max_units < 1:
            raise WorkbenchError(f"--max-units must be at least 1, got {max_units}")
        # The shortest units: the cost is dominated by long units in scripts the tokenizer splits finely.
        keep = set(sorted(keys, key=lambda k: (len(eng[k].encode()), keys.index(k)))[:max_units])
        keys = [k for k in keys if k in keep]
    return keys


def _derangement(n: int) -> list[int]:
    """A fixed pairing of unit i with unit (i + ⌈n/2⌉) mod n: never itself, deterministic."""
    return [(i + (n + 1) // 2) % n for i in range(n)]


@dataclass
class LanguageEncoding:
    """One forward pass over English and every language's units: what every score is computed from."""

    corpus: ParallelCorpus
    unit: str
    keys: list[str]  # the English units used
    slots: list[tuple[Language, list[str], list[int]]]  # language, its unit keys, their text indices
    texts: list[str]  # English units first (in ``keys`` order), then each language's
    enc: Encoded
    tm: TextModel
    model_name: str
    seconds: float
    length_matched: bool


def check_options(pairing: str | None = None, center: str | None = None, unit: str | None = None,
                  metric: str | None = None, pooling: str | None = None) -> None:
    """One line naming the first unknown option and the choices (before any model is loaded)."""
    for value, allowed, what in ((pairing, PAIRINGS, "pairing"), (center, CENTERINGS, "centering"),
                                 (unit, UNITS, "unit"), (metric, METRICS, "metric"), (pooling, POOLINGS, "pooling")):
        if value is not None and value not in allowed:
            raise WorkbenchError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")


def encode_languages(model, corpus: str | ParallelCorpus = "udhr", langs: list[str] | None = None,
                     unit: str = "article", max_units: int | None = None, poolings: tuple[str, ...] = ("last",),
                     batch_tokens: int = 4096, max_tokens: int | None = None, length_match: bool = False,
                     progress: bool = False, model_name: str | None = None) -> LanguageEncoding:
    """Run English and every language's units once, pooling every way asked (and, with ``length_match``,
    also over each pair's common token count)."""
    from ..loader import load

    check_options(unit=unit)
    for p in poolings:
        check_options(pooling=p)
    pc = corpus if isinstance(corpus, ParallelCorpus) else load_parallel(corpus)
    languages = pc.resolve(langs, unit)
    keys = _unit_keys(pc, unit, max_units)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model_name = model_name or str(model)
        model = load(model, n_ctx=max_tokens or 1024)  # rotary models: read texts this long
    tm = text_model(model, max_tokens)
    t0 = time.perf_counter()
    eng_units = pc.english.units(unit)
    texts = [eng_units[k] for k in keys]
    slots = []
    for lang in languages:
        units = lang.units(unit)
        have = [k for k in keys if k in units]
        slots.append((lang, have, list(range(len(texts), len(texts) + len(have)))))
        texts += [units[k] for k in have]
    cuts = None
    if length_match:
        width = tm.max_tokens - 1
        n = [min(len(tm.tokenize(t)), width) for t in texts]
        eng_index = {k: i for i, k in enumerate(keys)}
        cuts = {}
        for _, have, idx in slots:
            for k, i in zip(have, idx):
                c = min(n[i], n[eng_index[k]])
                cuts.setdefault(i, set()).add(c)
                cuts.setdefault(eng_index[k], set()).add(c)
    enc = encode_texts(tm, texts, poolings, batch_tokens, progress, desc="languages", cuts=cuts)
    return LanguageEncoding(pc, unit, keys, slots, texts, enc, tm, model_name or tm.name,
                            time.perf_counter() - t0, length_match)


def _pair(le: LanguageEncoding, pooling: str, have: list[str], idx: list[int],
          matched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[unit, layer, d] of the language's units and of their English originals."""
    eng_index = {k: i for i, k in enumerate(le.keys)}
    e_idx = [eng_index[k] for k in have]
    if not matched:
        pooled = le.enc.by_pooling[pooling]
        return pooled[idx], pooled[e_idx]
    n = le.enc.n_tokens
    width = le.tm.max_tokens - 1
    cut = [min(n[i], n[j], width) for i, j in zip(idx, e_idx)]
    full = le.enc.by_pooling[pooling]

    def at(i: int, c: int) -> torch.Tensor:  # a text cut to its own length is the text itself
        return le.enc.at_cut.get((pooling, i, c), full[i])
    return (torch.stack([at(i, c) for i, c in zip(idx, cut)]), torch.stack([at(j, c) for j, c in zip(e_idx, cut)]))


def check_units(code: str, n: int, pairing: str, center: str, retrieval: bool) -> None:
    """Retrieval, centering and a shuffled pairing each compare a unit with the others: one line naming
    every option that needs two units."""
    needs = [w for w, on in (("retrieval", retrieval), ("centering", center == "language"),
                             ("a shuffled pairing", pairing == "shuffled")) if on]
    if n < 2 and needs:
        verb = "need" if len(needs) > 1 else "needs"
        raise WorkbenchError(f"{code} has one unit: {' and '.join(needs)} {verb} at least two; use more units, or "
                             "--metric cosine --center none --pairing aligned")


def score_languages(le: LanguageEncoding, pooling: str = "last", pairing: str = "aligned", center: str = "language",
                    metric: str = "both", matched: bool | None = None, intervals: bool = True) -> dict:
    """Every language's cosine and/or retrieval score from an encoding, with intervals and confounds.
    ``matched``: use the length-matched representations (default: when the encoding has them).
    ``intervals=False``: skip the per-language bootstrap intervals (the Spearman intervals stay)."""
    check_options(pairing=pairing, center=center, metric=metric, pooling=pooling)
    matched = le.length_matched if matched is None else matched
    if matched and not le.length_matched:
        raise WorkbenchError("this encoding was made without length_match; encode with length_match=True")
    if pooling not in le.enc.by_pooling:
        raise WorkbenchError(f"pooling {pooling!r} was not computed in this encoding")
    cos_on, ret_on = metric in ("cosine", "both"), metric in ("retrieval", "both")
    rows = _language_rows(le, pooling, pairing, center, matched, cos_on, ret_on, intervals)
    primary = "retrieval" if metric == "retrieval" else "score"
    rows.sort(key=lambda r: (-r[primary], -r.get("retrieval", 0.0)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    n_eng = len(le.keys)
    eng_bits = float(le.enc.nll[:n_eng].sum()) / math.log(2)
    eng_bytes = sum(len(le.texts[i].encode()) for i in range(n_eng))
    result = {
        "model": le.model_name, "corpus": le.corpus.name, "pooling": pooling, "unit": le.unit, "pairing": pairing,
        "center": center, "metric": metric, "ranked_by": primary, "length_matched": matched,
        "n_layers": le.tm.n_layers, "units": le.keys, "max_tokens": le.tm.max_tokens,
        "english": {"bits_per_byte": eng_bits / eng_bytes if eng_bytes else None, "tokens": sum(le.enc.n_tokens[:n_eng])},
        "languages": rows, "seconds": round(le.seconds, 2), "tokens": int(sum(le.enc.n_tokens)),
    }
    result.update(_correlations(rows))
    if cos_on:
        result["score_definition"] = ("mean over layers of the cosine similarity between the pooled residual stream "
                                      "after each block for the text and for its English original, averaged over units")
    if ret_on:
        result["retrieval_definition"] = ("mean over layers of the share of units whose English original is the strict "
                                          "maximum of their row and column of the similarity matrix (MEXA)")
    return result


def _language_rows(le: LanguageEncoding, pooling: str, pairing: str, center: str, matched: bool, cos_on: bool,
                   ret_on: bool, intervals: bool) -> list[dict]:
    """One unranked row per language sharing units with English: its scores, then its confounds."""
    eng_units = le.corpus.english.units(le.unit)
    eng_tokens = dict(zip(le.keys, le.enc.n_tokens))
    rows = []
    for lang, have, idx in le.slots:
        if not have:
            continue
        x, e = _pair(le, pooling, have, idx, matched)
        check_units(lang.code, len(have), pairing, center, ret_on)
        if pairing == "shuffled":
            e = e[_derangement(len(have))]
        row = {"code": lang.code, "name": lang.name, "script": lang.script, "family": lang.family or None,
               "share": lang.share}
        # Bootstraps seeded by the language's position: the same encoding always gives the same intervals.
        row.update(_similarity_scores(x, e, center == "language", cos_on, ret_on, intervals, seed=len(rows)))
        row.update(_confounds(le, have, idx, eng_units, eng_tokens))
        rows.append(row)
    return rows


def _similarity_scores(x: torch.Tensor, e: torch.Tensor, centered: bool, cos_on: bool, ret_on: bool,
                       intervals: bool, seed: int) -> dict:
    """The cosine and/or retrieval entries of a language's row from its [unit, layer, d] pairs ``x``, ``e``."""
    n = len(x)
    row: dict = {}
    if cos_on:
        per_layer = cosine(x, e, centered).mean(0)
        row.update(score=float(per_layer.mean()), per_layer=[float(v) for v in per_layer],
                   score_ci95=cosine_interval(x, e, centered, seed=seed) if n >= 2 and intervals else None)
    if ret_on:
        hits = retrieval_hits(x, e, centered).float()  # [unit, layer]
        per_layer = hits.mean(0)
        row.update(retrieval=float(per_layer.mean()), retrieval_max=float(per_layer.max()),
                   retrieval_per_layer=[float(v) for v in per_layer],
                   retrieval_ci95=mean_interval(hits.mean(1), seed=seed) if intervals else None,
                   retrieval_chance=1 / (2 * n - 1))
    return row


def _confounds(le: LanguageEncoding, have: list[str], idx: list[int], eng_units: dict[str, str],
               eng_tokens: dict[str, int]) -> dict:
    """Bits per (English) byte, token ratio and counts of a language's units: what its scores are read beside."""
    bits = float(le.enc.nll[idx].sum()) / math.log(2)
    own_bytes = sum(len(le.texts[i].encode()) for i in idx)
    eng_bytes = sum(len(eng_units[k].encode()) for k in have)
    tokens = sum(le.enc.n_tokens[i] for i in idx)
    return {
        "bits_per_byte": bits / own_bytes if own_bytes else None,
        "bits_per_english_byte": bits / eng_bytes if eng_bytes else None,
        "token_ratio": tokens / max(1, sum(eng_tokens[k] for k in have)),
        "n_units": len(have), "n_truncated": sum(le.enc.truncated[i] for i in idx), "tokens": tokens,
    }


def _correlations(rows: list[dict]) -> dict:
    """Each score's Spearman (with interval) against bits per English byte and log share, the partial
    Spearman given the token ratio, and the token ratio's own Spearman with bits per English byte."""
    out: dict = {}
    bits = [r["bits_per_english_byte"] for r in rows]
    ratio = [r["token_ratio"] for r in rows]
    for name, key in (("score", "score"), ("retrieval", "retrieval")):
        if rows and key in rows[0]:
            vals = [r[key] for r in rows]
            out[f"spearman_{name}_vs_bits_per_english_byte"] = _finite(spearman(vals, bits))
            out[f"spearman_{name}_vs_bits_per_english_byte_ci95"] = spearman_interval(vals, bits)
            out[f"partial_spearman_{name}_vs_bits_per_english_byte_given_token_ratio"] = _finite(
                partial_spearman(vals, bits, ratio))
            if any(r["share"] for r in rows):
                log_share = [math.log(r["share"]) if r["share"] else None for r in rows]
                out[f"spearman_{name}_vs_log_share"] = _finite(spearman(vals, log_share))
                out[f"spearman_{name}_vs_log_share_ci95"] = spearman_interval(vals, log_share)
    out["spearman_token_ratio_vs_bits_per_english_byte"] = _finite(spearman(ratio, bits))
    return out


def rank_languages(model, corpus: str | ParallelCorpus = "udhr", langs: list[str] | None = None,
                   pooling: str = "last", unit: str = "article", max_units: int | None = None,
                   pairing: str = "aligned", center: str = "language", batch_tokens: int = 4096, max_tokens: int | None = None,
                   progress: bool = False, model_name: str | None = None, metric: str = "both",
                   length_match: bool = False) -> dict:
    """Rank languages by how close the model's representation of their text is to that of the English
    original. ``model``: a loaded model (``workbench.load``) or a spec for ``workbench.load``."""
    check_options(pairing=pairing, center=center, unit=unit, metric=metric, pooling=pooling)
    if max_units == 1:  # refused before the model is loaded and every text encoded
        check_units(f"every language with --max-units 1", 1, pairing, center, metric != "cosine")
    le = encode_languages(model, corpus, langs, unit, max_units, (pooling,), batch_tokens, max_tokens, length_match,
                          progress, model_name)
    return score_languages(le, pooling, pairing, center, metric)


def _finite(v: float) -> float | None:
    """JSON has no NaN: an undefined correlation (fewer than 3 languages) is null."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def ranking_table(result: dict) -> pd.DataFrame:
    """One row per language: rank, code, name, scores with intervals, bits per English byte, confounds."""
    cols = ["rank", "code", "name", "script", "retrieval", "retrieval_lo", "retrieval_hi", "score", "score_lo",
            "score_hi", "bits_per_english_byte", "bits_per_byte", "token_ratio", "n_units", "n_truncated", "tokens",
            "share", "family"]
    df = pd.DataFrame(result["languages"])
    for key in ("score", "retrieval"):
        if f"{key}_ci95" in df:
            df[f"{key}_lo"] = [ci[0] if ci else None for ci in df[f"{key}_ci95"]]
            df[f"{key}_hi"] = [ci[1] if ci else None for ci in df[f"{key}_ci95"]]
    return df[[c for c in cols if c in df.columns and not (c in ("share", "family") and df[c].isna().all())]]


def layer_table(result: dict) -> pd.DataFrame:
    """Tidy per-layer scores: one row per (language, layer), a column per metric computed."""
    rows = []
    for r in result["languages"]:
        n = len(r.get("per_layer") or r.get("retrieval_per_layer") or [])
        for layer in range(n):
            row = {"code": r["code"], "name": r["name"], "rank": r["rank"], "layer": layer}
            if "per_layer" in r:
                row["cosine"] = r["per_layer"][layer]
            if "retrieval_per_layer" in r:
                row["retrieval"] = r["retrieval_per_layer"][layer]
            rows.append(row)
    return pd.DataFrame(rows)
