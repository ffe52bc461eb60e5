"""DLA exactness over the bundled prompts on any models (SmolLM2, its RMSNorm-free version, run directories).

    python analyses/hf_attribution.py smollm2 results/smollm2_rmsfree [--out FILE.json]
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

import workbench
from workbench.analysis.dla import direct_logit_attribution
from workbench.analysis.prompts import load_prompts
from workbench.errors import WorkbenchError
from workbench.io import atomic_write_text


def per_prompt(spec: str) -> pd.DataFrame:
    model = workbench.load(spec)
    rows = []
    for p in load_prompts():
        try:
            r = direct_logit_attribution(model, p.prompt, p.answer, p.contrast)
        except WorkbenchError:  # an answer that is not one token in this tokenizer
            continue
        rows.append({"model": spec, "prompt": p.name, "logit_diff": r.logit, "dla_sum_error": abs(r.dla_sum - r.logit),
                     "nmae": r.nmae})
    return pd.DataFrame(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = pd.concat([per_prompt(m) for m in args.models])
    summary = rows.groupby("model", sort=False).agg(prompts=("nmae", "size"), nmae_median=("nmae", "median"),
                                                    nmae_mean=("nmae", "mean"), logit_diff_mean=("logit_diff", "mean"),
                                                    max_dla_sum_error=("dla_sum_error", "max")).reset_index()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        atomic_write_text(args.out, json.dumps({"summary": summary.to_dict("records"), "prompts": rows.to_dict("records")},
                                               indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
