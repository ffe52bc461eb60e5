"""Depth summary of a zoo: variance growth with depth and gradient-norm profile shape per norm; for a
zoo trained with several seeds (`workbench zoo --seeds 0,1,2`), each as mean [95 % interval] and the
paired differences of every norm against a reference norm, seed by seed.

    python analyses/depth_summary.py zoo/small [--tokens 16384] [--reference pre-ln] [--markdown]
(diagnostics are computed once and cached as <run>/diagnose.json)
"""

import argparse
import sys

import pandas as pd

from workbench.analysis.compare import SUMMARY_METRICS, depth_intervals, depth_paired, depth_summary
from workbench.analysis.intervals import format_interval
from workbench.errors import WorkbenchError
from workbench.studies import zoo_diagnostics
from workbench.zoo import run_dirs, run_groups, run_seeds

METRICS = ("final_val_loss", *SUMMARY_METRICS)


def tables(zoo: str, tokens: int, reference: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    import json

    summary = depth_summary(zoo_diagnostics(zoo, tokens))
    losses = {label: json.loads((d / "summary.json").read_text())["final_val_loss"] for label, d in run_dirs(zoo).items()}
    summary = summary.assign(final_val_loss=summary.model.map(losses))
    groups, seeds = run_groups(zoo), run_seeds(zoo)
    intervals = depth_intervals(summary, groups, seeds, METRICS)
    names = list(dict.fromkeys(groups.values()))
    if reference not in names:
        raise WorkbenchError(f"--reference {reference} is not a norm of {zoo}; choose one of {', '.join(names)}")
    paired = depth_paired(summary, groups, seeds, METRICS, [(n, reference) for n in names if n != reference])
    return summary, intervals, paired


def wide(intervals: pd.DataFrame) -> pd.DataFrame:
    """norm × metric, each cell "mean [lo, hi]"."""
    cells = intervals.assign(cell=[format_interval(r, 3) for r in intervals.to_dict("records")])
    out = cells.pivot(index="model", columns="metric", values="cell")[list(METRICS)]
    out.insert(0, "seeds", intervals.groupby("model").n.max())
    return out.loc[list(dict.fromkeys(intervals.model))]


def paired_wide(paired: pd.DataFrame) -> pd.DataFrame:
    """pair × metric, each cell "mean [lo, hi]" with * where the interval excludes 0."""
    cell = [format_interval(r, 3) + (" *" if r["excludes_zero"] else "") for r in paired.to_dict("records")]
    t = paired.assign(pair=paired.a + " − " + paired.b, cell=cell)
    return t.pivot(index="pair", columns="metric", values="cell")[list(METRICS)].loc[list(dict.fromkeys(t.pair))]


def markdown(t: pd.DataFrame) -> str:
    head = [t.index.name or "", *map(str, t.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(t.index, t.to_numpy().tolist())]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reference", default="pre-ln", help="the norm every other is compared with, seed by seed")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = ap.parse_args()
    try:
        summary, intervals, paired = tables(args.zoo, args.tokens, args.reference)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show = markdown if args.markdown else (lambda t: t.to_string())
    if intervals.n.max() < 2:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return 0
    print("mean [95% Student-t interval] over seeds\n")
    print(show(wide(intervals)))
    print(f"\npaired difference (norm − {args.reference}, same seed), mean [95% interval]; * = excludes 0\n")
    print(show(paired_wide(paired)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
