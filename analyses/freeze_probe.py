"""How far the removal schedule gets *without* fine-tuning: freeze the norms one at a time, in the
remove-ln order, each at the σ calibrated on the current (already partly frozen) model, and print
σ (ordinary, BOS, EOT) and the validation CE after each freeze.

    python analyses/freeze_probe.py zoo/small/pre-ln [--sites 40] [--special-positions 1]
    python analyses/freeze_probe.py smollm2 --special-positions 2

It shows where the frozen scales stop matching the live ones — e.g. SmolLM2, whose massive
activations move to ordinary tokens once its early MLP norms are frozen (docs/ln_removal.md).
"""

import argparse
import sys

import torch

from workbench.batches import TokenData, tokenize_works
from workbench.corpus_spec import load_corpus
import workbench
from workbench.norms.frozen import SpecialPositions
from workbench.removal.calibrate import calibrate_and_freeze
from workbench.removal.finetune import evaluate
from workbench.removal.gpt_sites import GPTRemoval


def adapter_for(spec: str):
    model = workbench.load(spec)
    return GPTRemoval(model), model.tokenizer


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sites", type=int, default=None, help="freeze only the first N sites")
    ap.add_argument("--special-positions", type=int, default=1)
    ap.add_argument("--corpus", default="english")
    ap.add_argument("--sigma", default="rms", help="rms | median | qNN, as remove-ln --sigma")
    args = ap.parse_args()
    adapter, tok = adapter_for(args.model)
    val = tokenize_works(tok, load_corpus(args.corpus).val)
    data = TokenData(args.corpus, tok, val, val)
    n_ctx = min(adapter.n_ctx, 128)
    batches = data.val_batches(3, 8, n_ctx)
    calib, evals = batches[0], batches[1:]
    pos = SpecialPositions(adapter.eot_id, args.special_positions)
    dev = torch.device("cpu")
    print(f"{'#':>3} {'site':<45}{'sigma':>10}{'sigma_bos':>11}{'sigma_eot':>11}{'val CE':>9}")
    print(f"{'':>3} {'(live norms)':<45}{'':>32}{evaluate(adapter.net, evals, pos, dev):>9.3f}")
    for i, site in enumerate(adapter.sites[: args.sites]):
        sig, _ = calibrate_and_freeze(adapter, site.norm, calib, pos, statistic=args.sigma)
        ce = evaluate(adapter.net, evals, pos, dev)
        fmt = lambda v: f"{v:>11.4g}" if v is not None else f"{'—':>11}"  # noqa: E731
        print(f"{i:>3} {site.name:<45}{sig['sigma']:>10.4g}{fmt(sig['sigma_bos'])}{fmt(sig['sigma_eot'])}{ce:>9.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
