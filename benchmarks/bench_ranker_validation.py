"""Validation table of the Language Ranker: metric × pooling × centering (× length matching) against
an independent measure, every cell from one forward pass per model.

    python benchmarks/bench_ranker_validation.py udhr [--every 4] [--max-units 10] --out FILE.json
    python benchmarks/bench_ranker_validation.py mixtures --runs runs/language_mixture --out FILE.json

``udhr``: SmolLM2-135M (bfloat16) on every ``--every``-th UDHR declaration (127 of 507 with 4) and the
``--max-units`` shortest English articles (all 30 with 30); each cell is Spearman(score, bits per English
byte) with its bootstrap interval and its partial Spearman given the token ratio; the shuffled pairing
is the baseline. ``mixtures``: the controlled mixtures of ``analyses/language_mixture.py`` (trained there
or here, one tiny model per transformation family and norm); each cell is Spearman(score, log share)
over the six synthetic languages. Needs ``workbench fetch smollm2`` for ``udhr``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import workbench
from workbench.io import atomic_write_json
from workbench.languages.encode import POOLINGS
from workbench.languages.parallel import load_parallel
from workbench.languages.ranker import CENTERINGS, encode_languages, score_languages


def _cells(le, independent: str) -> list[dict]:
    """Every (pooling, centering, length matching, pairing) × metric of one encoding."""
    rows = []
    for pooling in le.enc.by_pooling:
        for center in CENTERINGS:
            for matched in ((False, True) if le.length_matched else (False,)):
                for pairing in ("aligned", "shuffled"):
                    r = score_languages(le, pooling, pairing, center, "both", matched=matched, intervals=False)
                    for metric, key in (("cosine", "score"), ("retrieval", "retrieval")):
                        cell = {"pooling": pooling, "center": center, "length_matched": matched,
                                "pairing": pairing, "metric": metric}
                        if independent == "bits":
                            cell.update(
                                spearman=r[f"spearman_{key}_vs_bits_per_english_byte"],
                                ci95=r[f"spearman_{key}_vs_bits_per_english_byte_ci95"],
                                partial_given_token_ratio=r[
                                    f"partial_spearman_{key}_vs_bits_per_english_byte_given_token_ratio"],
                                mean=sum(x[key] for x in r["languages"]) / len(r["languages"]))
                        else:
                            cell.update(spearman=r.get(f"spearman_{key}_vs_log_share"),
                                        values={x["code"]: x[key] for x in r["languages"]})
                        rows.append(cell)
    return rows


def udhr(a) -> dict:
    pc = load_parallel("udhr")
    codes = [lang.code for lang in pc.resolve(None, "article")][:: a.every]
    model = workbench.load("smollm2", n_ctx=1024)  # the Ranker reads texts of up to 1024 tokens
    model.to(torch.bfloat16)
    t0 = time.perf_counter()
    le = encode_languages(model, pc, codes, "article", a.max_units, tuple(a.poolings.split(",")), length_match=True,
                          progress=True, model_name="smollm2 (bfloat16)")
    encode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    cells = _cells(le, "bits")
    base = score_languages(le, next(iter(le.enc.by_pooling)), "aligned", "language", "both", matched=False)
    return {"what": "udhr", "languages": len(codes), "max_units": a.max_units, "tokens": base["tokens"],
            "encode_seconds": round(encode_s, 1), "score_seconds": round(time.perf_counter() - t1, 1),
            "spearman_token_ratio_vs_bits_per_english_byte": base["spearman_token_ratio_vs_bits_per_english_byte"],
            "per_language": [{k: x.get(k) for k in ("code", "script", "score", "retrieval", "bits_per_english_byte",
                                                       "token_ratio", "n_truncated")} for x in base["languages"]],
            "cells": cells}


def mixtures(a) -> dict:
    from workbench.languages.study import mixture_spec, mixture_study
    from workbench.languages.synthetic import FAMILIES

    # the models of analyses/language_mixture.py (4 layers), trained here when missing
    mixture_study(a.runs, model_overrides={"n_layers": 4}, progress=False)
    out = []
    for family in FAMILIES:
        spec = mixture_spec(family)
        for norm in ("pre-ln", "pre-rms"):
            run = Path(a.runs) / family / norm
            le = encode_languages(workbench.load(run), spec, None, "article", None, POOLINGS, model_name=str(run))
            for cell in _cells(le, "share"):
                out.append({"family": family, "norm": norm, **cell})
    return {"what": "mixtures", "cells": out}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("udhr", "mixtures"))
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--max-units", type=int, default=10)
    p.add_argument("--runs", default="runs/language_mixture")
    p.add_argument("--poolings", default=",".join(POOLINGS), help="udhr: the poolings to compute (default all)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.perf_counter()
    result = udhr(a) if a.what == "udhr" else mixtures(a)
    result.update(seconds=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(),
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    atomic_write_json(Path(a.out), result)
    for c in result["cells"]:
        if c["pairing"] == "aligned" or result["what"] == "udhr":
            where = f"{c.get('family', '')} {c.get('norm', '')}".strip()
            print(where, c["metric"], c["pooling"], c["center"], "matched" if c["length_matched"] else "", c["pairing"],
                  json.dumps({k: c.get(k) for k in ("spearman", "ci95", "partial_given_token_ratio")}))
    print(f"wrote {a.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
