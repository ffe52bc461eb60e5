"""Depth summary of a zoo: variance growth with depth and gradient-norm profile shape per norm.

    python analyses/depth_summary.py zoo/small [--tokens 16384]
(diagnostics are computed once and cached as <run>/diagnose.json)
"""

import argparse
import sys

from workbench.analysis.compare import depth_summary, zoo_diagnostics
from workbench.errors import WorkbenchError


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    try:
        table = depth_summary(zoo_diagnostics(args.zoo, args.tokens))
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
