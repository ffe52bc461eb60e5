"""The attribution table across a zoo's norms (DLA exactness, patching agreement, confidence neurons).

    python analyses/attribution_table.py zoo/tiny [pre-ln,lns,pre-rms,dyt,none] [--out FILE.json]
"""

import argparse
import sys
from pathlib import Path

import workbench
from workbench.analysis.report import attribution_report
from workbench.io import atomic_write_text
from workbench.zoo import collect_existing


def markdown(table) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("norms", nargs="?", default="pre-ln,lns,pre-rms,dyt,none")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    present = collect_existing(args.zoo)
    names = [n for n in args.norms.split(",") if n in present]
    if not names:
        print(f"none of {args.norms} is trained in {args.zoo}; run `workbench zoo --out {args.zoo}`", file=sys.stderr)
        return 2
    table = attribution_report({n: workbench.load(Path(args.zoo) / n) for n in names})
    print(markdown(table))
    if args.out:
        atomic_write_text(args.out, table.to_json(orient="records", indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
