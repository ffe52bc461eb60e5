"""Where a (norm-free) model still works: held-out text, the same after BOS, random tokens, a long context.

    python analyses/robustness_probe.py runs/smol/S4-kl [runs/smol/S4-kl/control …] [--n-ctx 128] [--corpus english]

Prints one markdown table per model (``workbench.removal.robustness``, the rows `remove-ln` now writes to
``summary.json["robustness"]``), for runs made before it did.
"""

import argparse

import torch

import workbench
from workbench.batches import load_token_data
from workbench.removal.robustness import robustness


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--n-ctx", type=int, default=128, help="the fine-tuning window (SmolLM2's removal default: 128)")
    ap.add_argument("--corpus", default="english")
    args = ap.parse_args()
    for spec in args.models:
        model = workbench.load(spec)
        data = load_token_data(args.corpus, model.cfg.d_vocab, tokenizer=model.tokenizer)
        print(f"### {spec}\n\n| probe | sequences × positions | CE | max abs resid | finite |\n|---|---:|---:|---:|---|")
        for r in robustness(model, data, args.n_ctx, torch.device("cpu")):
            print(f"| {r['probe']} | {r['sequences']} × {r['positions']} | {r['ce']:.4f} | {r['max_abs_resid']:.3g} | "
                  f"{r['finite']} |")
        print()


if __name__ == "__main__":
    main()
