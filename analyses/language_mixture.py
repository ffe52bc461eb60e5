"""Controlled test of Language Ranker: train pre-ln and pre-rms models on synthetic-language mixtures
(one per transformation family, English 40 %, six languages at 28 % … 0.5 %) and report
Spearman(score, log share) per norm and family.

    python analyses/language_mixture.py --out runs/language_mixture [--norms pre-ln,pre-rms] [--layers 4]
"""

import argparse
import sys

from workbench.errors import WorkbenchError
from workbench.languages.study import mixture_study
from workbench.languages.synthetic import FAMILIES


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/language_mixture")
    p.add_argument("--norms", default="pre-ln,pre-rms")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int)
    p.add_argument("--pooling", default="last")
    a = p.parse_args()
    try:
        table, summary = mixture_study(a.out, tuple(a.families.split(",")), tuple(a.norms.split(",")), a.preset,
                                       a.steps, {"n_layers": a.layers}, pooling=a.pooling)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.drop(columns="per_layer").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
