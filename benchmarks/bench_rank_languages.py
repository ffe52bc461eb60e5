"""Language Ranker on SmolLM2-135M over ≥ 100 UDHR declarations on 2 CPU cores: wall-clock time of the
whole ranking (tokenize, forward, NLL, similarities) in float32 and in bfloat16, side by side, with the
rank agreement between the two and each one's Spearman against bits per English byte.

    python benchmarks/bench_rank_languages.py [--every 4] [--max-units 10] [--out FILE.json]

Languages: every ``--every``-th declaration of the corpus in its order (127 of 507 with 4), so every
script family is represented. Units: the ``--max-units`` shortest English articles (the same for every
language), read whole. Needs ``workbench fetch smollm2`` once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import workbench
from workbench.languages.parallel import load_parallel
from workbench.languages.ranker import rank_languages, spearman


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--max-units", type=int, default=10)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out")
    a = p.parse_args()
    pc = load_parallel("udhr")
    codes = [lang.code for lang in pc.resolve(None, "article")][:: a.every]
    runs = {}
    for name in a.dtypes.split(","):
        t0 = time.perf_counter()
        model = workbench.load("smollm2", n_ctx=1024)  # the Ranker reads texts of up to 1024 tokens
        model.to(getattr(torch, name))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = rank_languages(model, pc, codes, max_units=a.max_units, model_name="smollm2")
        s = time.perf_counter() - t0
        runs[name] = {"seconds": round(s, 1), "load_seconds": round(load_s, 1), "tokens": r["tokens"],
                      "tokens_per_s": round(r["tokens"] / s), "languages": len(r["languages"]),
                      "spearman_score_vs_bits_per_english_byte": r["spearman_score_vs_bits_per_english_byte"],
                      "scores": {x["code"]: x["score"] for x in r["languages"]},
                      "bits": {x["code"]: x["bits_per_english_byte"] for x in r["languages"]}}
        print(f"{name}: {len(r['languages'])} languages, {r['tokens']} tokens, {s:.1f} s "
              f"({r['tokens'] / s:.0f} tok/s; model load {load_s:.1f} s); Spearman(score, bits/Eng byte) "
              f"{r['spearman_score_vs_bits_per_english_byte']:.3f}")
        del model
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads",
           "every": a.every, "max_units": a.max_units, "runs": runs}
    if {"float32", "bfloat16"} <= runs.keys():
        f, b = runs["float32"], runs["bfloat16"]
        codes = list(f["scores"])
        out["bf16_speedup"] = round(f["seconds"] / b["seconds"], 2)
        out["spearman_scores_fp32_vs_bf16"] = spearman([f["scores"][c] for c in codes], [b["scores"][c] for c in codes])
        out["max_abs_score_diff"] = max(abs(f["scores"][c] - b["scores"][c]) for c in codes)
        out["max_rel_bits_diff"] = max(abs(f["bits"][c] - b["bits"][c]) / f["bits"][c] for c in codes)
        print(f"bf16 is {out['bf16_speedup']}× faster; scores agree: Spearman {out['spearman_scores_fp32_vs_bf16']:.4f}, "
              f"max |Δscore| {out['max_abs_score_diff']:.4f}, max rel. Δbits {out['max_rel_bits_diff']:.4f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
