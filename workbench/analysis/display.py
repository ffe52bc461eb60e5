"""Tables for reading, from the tidy tables: worded column labels with units, intervals as one cell
("4.45 [4.44, 4.46]", the bare mean for one seed), and a precision that shows what is meaningful. The
tidy tables stay the source of truth (downloads, tests); these are what a page or a report shows."""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd

from .compare import SUMMARY_TITLES

DIGITS = 3


def number(v: Any, digits: int = DIGITS) -> str:
    """``digits`` significant decimals for values near 1, fewer leading zeros lost for small ones."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    v = float(v)
    if v != 0 and abs(v) < 10 ** -(digits - 1):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"


def interval(mean: Any, lo: Any = None, hi: Any = None, digits: int = DIGITS) -> str:
    """``mean [lo, hi]``; just the mean where there is no interval (one seed), blank where no mean."""
    m = number(mean, digits)
    if not m or lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return m
    return f"{m} [{number(lo, digits)}, {number(hi, digits)}]"


def zoo_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per zoo member (``workbench.zoo.collect``'s records)."""
    rows = []
    for norm, r in results.items():
        rows.append({
            "Normalization": norm,
            "Seeds": len(r.get("seeds") or {0: None}),
            "Validation loss (nats)": interval(r.get("final_val_loss"), r.get("final_val_loss_lo"),
                                               r.get("final_val_loss_hi")),
            "Diverged": f"at step {r['diverged_at_step']}" if r.get("diverged") else "no",
            "Steps": r.get("steps"),
            "Training time (s)": round(r["seconds"], 1) if r.get("seconds") is not None else None,
            "Precision": r.get("dtype"),
        })
    return pd.DataFrame(rows)


def seed_intervals(intervals: pd.DataFrame, titles: Mapping[str, str] = SUMMARY_TITLES) -> pd.DataFrame:
    """``seed_table`` / ``depth_intervals`` rows: model, metric in words, seeds, mean [95 % interval]."""
    return pd.DataFrame({
        "Model": intervals.model, "Metric": intervals.metric.map(lambda k: titles.get(k, k)), "Seeds": intervals.n,
        "Mean [95% interval]": [interval(m, lo, hi) for m, lo, hi in zip(intervals["mean"], intervals.lo, intervals.hi)],
    })


def paired(table: pd.DataFrame, titles: Mapping[str, str] = SUMMARY_TITLES) -> pd.DataFrame:
    """``paired_table`` rows in words: A − B with its interval, the paired t-test's p."""
    return pd.DataFrame({
        "Model": table.a, "Against": table.b, "Metric": table.metric.map(lambda k: titles.get(k, k)),
        "Seeds": table.n,
        "Difference A − B [95% interval]": [interval(m, lo, hi) for m, lo, hi in zip(table["mean"], table.lo, table.hi)],
        "p (paired t-test)": [number(p, 2) for p in table.p],
        "Interval excludes 0": table.excludes_zero.map({True: "yes", False: "no"}).fillna(""),
    })


DEPTH_SUMMARY = {
    "model": "Model", "val_ce": "Cross-entropy (nats)", "var_growth": "Variance growth h_L / h_1",
    "var_growth_from_embedding": "Variance growth h_L / h_0", "var_growth_median_token": "Variance growth, median token",
    "grad_cv": "Gradient-norm CV across blocks", "grad_deep_shallow": "Gradient norm deepest / shallowest third",
    "max_ablation_delta_ce": "Largest ΔCE when a block is skipped (nats)",
    "ablation_delta_ce_last_third": "Mean ΔCE, last third skipped (nats)",
}
SCHEDULE = {"event": "Event", "norm": "Norm frozen", "step": "At step", "sigma": "Frozen scale σ",
            "sigma_bos": "σ at BOS", "sigma_eot": "σ at end of text", "ce_before": "CE before (nats)"}
REMOVAL_CE = {"model": "Model", "ce": "Cross-entropy (nats)", "minus_control": "Δ vs control (nats)"}
ATTRIBUTION = {
    "model": "Model", "norm": "Normalization", "dla_prompts": "Prompts", "dla_nmae_median": "DLA error (median NMAE)",
    "dla_nmae_mean": "DLA error (mean NMAE)", "patch_pairs": "Prompt pairs",
    "patch_correlation_mean": "Attribution vs activation patching (mean r)",
    "patch_correlation_min": "Attribution vs activation patching (min r)",
    "conf_null_share": "Confidence neurons: null-space share",
    "conf_entropy_effect": "Confidence neurons: |entropy effect| (nats)",
    "conf_share_via_norm_scale": "Confidence neurons: share via the norm's scale",
}
COMPONENTS = {"name": "Component", "kind": "Kind", "layer": "Layer", "head": "Head", "dla": "DLA (logits)",
              "direct_effect": "Direct effect (logits)"}


def worded(table: pd.DataFrame, labels: Mapping[str, str], digits: int = DIGITS) -> pd.DataFrame:
    """``table`` with its columns renamed by ``labels`` (others kept, underscores as spaces) and every
    float column rounded to ``digits`` decimals (a cell stays a number: it still sorts)."""
    out = table.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].round(digits)
    return out.rename(columns={c: labels.get(c, str(c).replace("_", " ")) for c in out.columns})


def ranking(table: pd.DataFrame) -> pd.DataFrame:
    """``ranking_table`` in words: each score with its bootstrap interval in one cell."""
    out = pd.DataFrame({"Rank": table["rank"], "Code": table.code, "Language": table.name})
    if "script" in table:
        out["Script"] = table.script
    for key, label in (("retrieval", "Retrieval (MEXA) [95% interval]"), ("score", "Cosine score [95% interval]")):
        if key in table:
            lo, hi = table.get(f"{key}_lo", [None] * len(table)), table.get(f"{key}_hi", [None] * len(table))
            out[label] = [interval(m, a, b) for m, a, b in zip(table[key], lo, hi)]
    rest = {"bits_per_english_byte": "Bits per English byte", "bits_per_byte": "Bits per byte",
            "token_ratio": "Tokens per English token", "n_units": "Units", "n_truncated": "Units cut",
            "tokens": "Tokens", "share": "Training share", "family": "Family"}
    for key, label in rest.items():
        if key in table:
            out[label] = table[key].round(DIGITS) if pd.api.types.is_float_dtype(table[key]) else table[key]
    return out
