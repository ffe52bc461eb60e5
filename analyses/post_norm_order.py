"""Where should a sandwich block's output norms (``ln1_post``, ``ln2_post``) go in the removal schedule?
``remove-ln`` freezes them first; this probe runs the same removal with them last (after ``ln_final``) on the
same data, and prints both arms' CE for each model.

    python analyses/post_norm_order.py zoo/tiny/peri-ln zoo/tiny/post-sub [--out runs/post_order]
"""

import argparse
import json
import sys
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.removal import remove_ln
from workbench.removal import gpt_sites
from workbench.removal.schedule import standard_schedule


def post_last(ln2, ln1_qk, ln1_v, final, ln2_up=None, post=None, qk=None):
    """The default order with the output norms moved after the final norm."""
    return [*standard_schedule(ln2, ln1_qk, ln1_v, final, ln2_up, post=None, qk=qk), *(post or [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default="runs/post_order")
    a = ap.parse_args(argv)
    rows = []
    for spec in a.models:
        for order in ("first", "last"):
            out = Path(a.out) / f"{Path(spec).name}-{order}"
            gpt_sites.standard_schedule = standard_schedule if order == "first" else post_last
            s = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else \
                remove_ln(spec, out, progress=False)
            rows.append((spec, order, s["ce_original"], s["ce_control"], s["ce_ln_free"]))
    print("| model | post-norms | CE original | CE control | CE norm-free | Δ vs control |\n|---|---|---:|---:|---:|---:|")
    for spec, order, o, c, f in rows:
        print(f"| {spec} | {order} | {o:.4f} | {c:.4f} | {f:.4f} | {f - c:+.4f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
