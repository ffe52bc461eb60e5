"""The attribution table across a zoo's norms (DLA exactness, patching agreement, confidence neurons).

    python analyses/attribution_table.py zoo/tiny [pre-ln,lns,pre-rms,dyt,none] [--out FILE.json]

An entry LABEL=PATH adds any run directory under its own label, e.g. the LN-free model from
`workbench remove-ln`:  pre-ln,pre-ln/ln-free=runs/ln_free_pre-ln. PATH may be any model spec
(smollm2, a Hugging Face directory, its RMSNorm-free version).
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
    entries = []
    for e in args.norms.split(","):
        label, path = e.split("=", 1) if "=" in e else (e, Path(args.zoo) / e)
        if ("=" in e and (Path(path).is_dir() or path == "smollm2")) or label in present:
            entries.append((label, Path(path)))
    if not entries:
        print(f"none of {args.norms} is trained in {args.zoo}; run `workbench zoo --out {args.zoo}`", file=sys.stderr)
        return 2
    table = attribution_report({label: workbench.load(path) for label, path in entries})
    print(markdown(table))
    if args.out:
        atomic_write_text(args.out, table.to_json(orient="records", indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
