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
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import WorkbenchError
from .encode import encode_texts, text_model
from .parallel import UNITS, ParallelCorpus, load_parallel

PAIRINGS = ("aligned", "shuffled")
BOOTSTRAP = 200  # resamples of the units for the score's 95 % interval
CENTERINGS = ("language", "none")


def spearman(x, y) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties share their mean rank); NaN below 3 points."""
    a, b = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return float("nan")
    ra, rb = a[ok].rank(), b[ok].rank()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


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


def _similarity(x: torch.Tensor, e: torch.Tensor, center: bool) -> torch.Tensor:
    """Cosine per unit and layer, [unit, layer], after subtracting each side's mean over units."""
    if center:
        x, e = x - x.mean(0), e - e.mean(0)
    return F.cosine_similarity(x, e, dim=-1)


def _score_interval(x: torch.Tensor, e: torch.Tensor, center: bool, seed: int) -> list[float]:
    """95 % percentile-bootstrap interval of the score over units (centering redone per resample)."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (BOOTSTRAP, n), generator=g)
    scores = torch.stack([_similarity(x[i], e[i], center).mean() for i in idx])
    lo, hi = torch.quantile(scores, torch.tensor([0.025, 0.975]))
    return [float(lo), float(hi)]


def _derangement(n: int) -> list[int]:
    """A fixed pairing of unit i with unit (i + ⌈n/2⌉) mod n: never itself, deterministic."""
    return [(i + (n + 1) // 2) % n for i in range(n)]


def rank_languages(model, corpus: str | ParallelCorpus = "udhr", langs: list[str] | None = None,
                   pooling: str = "last", unit: str = "article", max_units: int | None = None,
                   pairing: str = "aligned", center: str = "language", batch_tokens: int = 4096, max_tokens: int | None = None,
                   progress: bool = False, model_name: str | None = None) -> dict:
    """Rank languages by how close the model's representation of their text is to that of the English
    original. ``model``: a loaded model (``workbench.load``) or a spec for ``workbench.load``."""
    import workbench

    if pairing not in PAIRINGS:
        raise WorkbenchError(f"unknown pairing {pairing!r}; choose one of: {', '.join(PAIRINGS)}")
    if center not in CENTERINGS:
        raise WorkbenchError(f"unknown centering {center!r}; choose one of: {', '.join(CENTERINGS)}")
    if unit not in UNITS:
        raise WorkbenchError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
    pc = corpus if isinstance(corpus, ParallelCorpus) else load_parallel(corpus)
    languages = pc.resolve(langs, unit)
    keys = _unit_keys(pc, unit, max_units)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model_name = model_name or str(model)
        model = workbench.load(model, n_ctx=max_tokens or 1024)  # rotary models: read texts this long
    tm = text_model(model, max_tokens)
    t0 = time.perf_counter()

    eng_units = pc.english.units(unit)
    texts = [eng_units[k] for k in keys]
    slots: list[tuple[list[str], list[int]]] = []
    for lang in languages:
        units = lang.units(unit)
        have = [k for k in keys if k in units]
        slots.append((have, list(range(len(texts), len(texts) + len(have)))))
        texts += [units[k] for k in have]
    enc = encode_texts(tm, texts, pooling, batch_tokens, progress, desc="languages")
    eng_index = {k: i for i, k in enumerate(keys)}

    rows = []
    for lang, (have, idx) in zip(languages, slots):
        if not have:
            continue
        e_idx = [eng_index[k] for k in have]
        if pairing == "shuffled":
            if len(have) < 2:
                raise WorkbenchError(f"{lang.code} has one unit; a shuffled pairing needs at least two")
            e_idx = [e_idx[j] for j in _derangement(len(have))]
        x, e = enc.pooled[idx], enc.pooled[e_idx]  # [unit, layer, d_model]
        if center == "language" and len(have) < 2:
            raise WorkbenchError(f"{lang.code} has one unit: centering needs at least two; use --center none")
        per_layer = _similarity(x, e, center == "language").mean(0)
        interval = _score_interval(x, e, center == "language", seed=len(rows)) if len(have) >= 2 else None
        bits = float(enc.nll[idx].sum()) / math.log(2)
        own_bytes = sum(len(texts[i].encode()) for i in idx)
        eng_bytes = sum(len(eng_units[k].encode()) for k in have)
        rows.append({
            "code": lang.code, "name": lang.name, "script": lang.script, "family": lang.family or None,
            "share": lang.share, "score": float(per_layer.mean()), "score_ci95": interval,
            "per_layer": [float(v) for v in per_layer],
            "bits_per_byte": bits / own_bytes if own_bytes else None,
            "bits_per_english_byte": bits / eng_bytes if eng_bytes else None,
            "n_units": len(have), "n_truncated": sum(enc.truncated[i] for i in idx),
            "tokens": sum(enc.n_tokens[i] for i in idx),
        })
    rows.sort(key=lambda r: -r["score"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    eng_bits = float(enc.nll[: len(keys)].sum()) / math.log(2)
    eng_bytes = sum(len(texts[i].encode()) for i in range(len(keys)))
    result = {
        "model": model_name or tm.name, "corpus": pc.name, "pooling": pooling, "unit": unit,
        "pairing": pairing, "center": center, "n_layers": tm.n_layers, "units": keys, "max_tokens": tm.max_tokens,
        "score_definition": "mean over layers of the cosine similarity between the pooled residual stream "
                            "after each block for the text and for its English original, averaged over units",
        "english": {"bits_per_byte": eng_bits / eng_bytes if eng_bytes else None, "tokens": sum(enc.n_tokens[:len(keys)])},
        "languages": rows,
        "spearman_score_vs_bits_per_english_byte": _finite(spearman([r["score"] for r in rows],
                                                                    [r["bits_per_english_byte"] for r in rows])),
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens": int(sum(enc.n_tokens)),
    }
    if any(r["share"] for r in rows):
        result["spearman_score_vs_log_share"] = _finite(spearman([r["score"] for r in rows],
                                                                 [math.log(r["share"]) for r in rows]))
    return result


def _finite(v: float) -> float | None:
    """JSON has no NaN: an undefined correlation (fewer than 3 languages) is null."""
    return None if math.isnan(v) else v


def ranking_table(result: dict) -> pd.DataFrame:
    """One row per language: rank, code, name, score, bits per English byte, …"""
    cols = ["rank", "code", "name", "script", "score", "score_lo", "score_hi", "bits_per_english_byte", "bits_per_byte", "n_units",
            "n_truncated", "tokens", "share", "family"]
    df = pd.DataFrame(result["languages"])
    if "score_ci95" in df:
        df["score_lo"] = [ci[0] if ci else None for ci in df["score_ci95"]]
        df["score_hi"] = [ci[1] if ci else None for ci in df["score_ci95"]]
    return df[[c for c in cols if c in df.columns and not (c in ("share", "family") and df[c].isna().all())]]


def layer_table(result: dict) -> pd.DataFrame:
    """Tidy per-layer similarities: one row per (language, layer)."""
    return pd.DataFrame([{"code": r["code"], "name": r["name"], "rank": r["rank"], "layer": layer, "cosine": v}
                         for r in result["languages"] for layer, v in enumerate(r["per_layer"])])
