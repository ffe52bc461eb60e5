"""The trend of a remove-ln run, stretch by stretch: median training loss, the control's on the same
batches, their gap, the KL to the teacher when distilling, and the steps that held a runaway window.

    python analyses/cooldown_trend.py runs/smol/S15 [--every 32] [--phase cool-down]
"""

from __future__ import annotations

import argparse
import sys

from workbench.errors import WorkbenchError
from workbench.removal.report import read_removal, stretch_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a finished remove-ln --out directory (metrics.jsonl)")
    p.add_argument("--every", type=int, default=32, help="steps per stretch (default 32)")
    p.add_argument("--phase", choices=["precondition", "removal", "cool-down"], help="only this phase")
    a = p.parse_args()
    try:
        _, _, metrics = read_removal(a.directory)
        t = stretch_table(metrics, a.every)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.phase and not t.empty:
        t = t[t.phase == a.phase]
    print(t.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
