"""The controlled test of Language Ranker's claim: train models on mixtures whose language shares we
set, then ask whether the Ranker score follows the share.

One mixture per transformation family (``synthetic.FAMILIES``): English at 40 % and six synthetic
languages of that family at 28 % … 0.5 % (56× apart). Every (family, norm) model is trained from the
same seed on its mixture and ranked on held-out parallel text (``mixture.heldout_parallel``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..errors import WorkbenchError
from ..io import atomic_write_json, atomic_write_text
from .ranker import rank_languages, spearman
from .synthetic import FAMILIES

ENGLISH_SHARE = 0.4
SHARES = (0.28, 0.16, 0.09, 0.045, 0.02, 0.005)


def mixture_spec(family: str, shares: tuple[float, ...] = SHARES, base: str | None = None) -> str:
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown family {family!r}; choose from: {', '.join(FAMILIES)}")
    langs = FAMILIES[family][: len(shares)]
    spec = "mix:" + ",".join([f"eng={1 - sum(shares):g}"] + [f"{n}={s:g}" for n, s in zip(langs, shares)])
    return spec + (f";base={base}" if base else "")


def mixture_study(out_dir: str | Path, families: tuple[str, ...] = tuple(FAMILIES),
                  norms: tuple[str, ...] = ("pre-ln", "pre-rms"), preset: str = "tiny", steps: int | None = None,
                  model_overrides: dict | None = None, shares: tuple[float, ...] = SHARES, seed: int = 0,
                  pooling: str = "last", base: str | None = None, train_overrides: dict | None = None,
                  progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or reuse) one model per (family, norm) under ``out_dir`` and rank its languages.
    Returns (per-language rows, per-(family, norm) Spearman summary); both are also written as CSV."""
    from ..loader import load
    from ..train import train

    out = Path(out_dir)
    rows = []
    for family in families:
        spec = mixture_spec(family, shares, base)
        for norm in norms:
            run = out / family / norm
            if not (run / "summary.json").is_file():
                train(norm, run, preset=preset, steps=steps, seed=seed, corpus=spec,
                      model_overrides=model_overrides, train_overrides=train_overrides, progress=progress)
            result = rank_languages(load(run), spec, pooling=pooling, model_name=str(run))
            for r in result["languages"]:
                rows.append({"family": family, "norm": norm, "code": r["code"], "share": r["share"],
                             "log_share": math.log(r["share"]), "score": r["score"],
                             "bits_per_english_byte": r["bits_per_english_byte"],
                             "per_layer": r["per_layer"]})
    table = pd.DataFrame(rows)
    summary = pd.DataFrame([
        {"family": f, "norm": n, "languages": len(g),
         "spearman_score_vs_log_share": spearman(g["score"], g["log_share"]),
         "spearman_bits_vs_log_share": spearman(g["bits_per_english_byte"], g["log_share"]),
         "spearman_score_vs_bits": spearman(g["score"], g["bits_per_english_byte"])}
        for (f, n), g in table.groupby(["family", "norm"], sort=False)])
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if pooling == "last" else f"_{pooling}"  # the same models ranked with another pooling sit beside
    atomic_write_text(out / f"mixture_languages{tag}.csv", table.drop(columns="per_layer").to_csv(index=False))
    atomic_write_text(out / f"mixture_summary{tag}.csv", summary.to_csv(index=False))
    atomic_write_json(out / f"mixture_study{tag}.json", {"families": list(families), "norms": list(norms),
                                                   "preset": preset, "steps": steps, "shares": list(shares),
                                                   "model_overrides": model_overrides or {}, "seed": seed,
                                                   "pooling": pooling, "languages": rows,
                                                   "summary": summary.to_dict("records")})
    return table, summary
