"""Does a scale-uniformity loss make a model's norms removable? Measure, on a Llama model (SmolLM2), the
spread of log per-token scale at the norm inputs and the largest token scale over the median, plus the
no-fine-tuning freeze probe (validation CE as the MLP norms are frozen one by one) — before and after P
steps of fine-tuning on CE + W · spread with every norm live.

    python analyses/precondition_probe.py smollm2 --weight 10 --steps 60 --lr 1e-4
"""

import argparse
import copy
import sys
import time

import torch

import workbench
from workbench.batches import load_token_data
from workbench.model.gpt import lm_cross_entropy
from workbench.norms.frozen import SpecialPositions
from workbench.removal.calibrate import calibrate_and_freeze
from workbench.removal.finetune import evaluate
from workbench.removal.losses import log_scale, scale_spread
from workbench.removal.gpt_sites import GPTRemoval

PROBED = (2, 5, 8, 11, 14, 17, 20, 23, 29)  # MLP norms of these layers: CE after freezing through them


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--weight", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--special-positions", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = workbench.load(a.model)
    tok = model.tokenizer
    ad = GPTRemoval(model, 128)
    data = load_token_data("english", tok.get_vocab_size(), tokenizer=tok)
    val = data.val_batches(3, 8, 128)
    calib, evals = val[0], val[1:]
    pos = SpecialPositions(ad.eot_id, a.special_positions)
    cpu = torch.device("cpu")
    n_mlp = model.cfg.n_layers

    def capture(into: list):
        return [s.norm.register_forward_pre_hook(lambda m, args: into.append(log_scale(args[0], m.standardize.centers)))
                for s in ad.sites]

    @torch.no_grad()
    def report(tag: str) -> None:
        scales: list = []
        hooks = capture(scales)
        pos.update(calib)
        ad.net(calib)
        for h in hooks:
            h.remove()
        keep = pos.ordinary()
        spread = [scale_spread([ls], keep).item() for ls in scales[:n_mlp]]
        ratio = [(ls[keep].max() - ls[keep].median()).exp().item() for ls in scales[:n_mlp]]
        print(f"{tag}: val CE {evaluate(ad.net, evals, pos, cpu):.3f}; MLP-norm inputs: mean spread of log scale "
              f"{sum(spread) / n_mlp:.4f}, max token scale / median at layers 0,3,…: {[round(r, 1) for r in ratio[::3]]}")
        probe = copy.deepcopy(ad)
        ces = []
        for i, site in enumerate(probe.sites[:n_mlp]):
            calibrate_and_freeze(probe, site.norm, calib, pos)
            if i in PROBED:
                ces.append(f"{i}: {evaluate(probe.net, evals, pos, cpu):.3f}")
        print(f"{tag}: val CE with the MLP norms frozen through layer (no fine-tuning) — {', '.join(ces)}", flush=True)

    report("before")
    opt = torch.optim.AdamW([p for p in ad.net.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    scales: list = []
    hooks = capture(scales)
    ad.net.train()
    t0 = time.time()
    for step in range(a.steps):
        batch = data.train_batch(step, 4, 128, 1)
        pos.update(batch)
        scales.clear()
        ce = lm_cross_entropy(ad.net(batch).float(), batch)
        spread = scale_spread(scales, pos.ordinary())
        (ce + a.weight * spread).backward()
        torch.nn.utils.clip_grad_norm_(ad.net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step}: CE {ce.item():.3f}, spread (all sites) {spread.item():.4f}, {time.time() - t0:.0f} s",
                  flush=True)
    for h in hooks:
        h.remove()
    ad.net.eval()
    report(f"after {a.steps} steps, weight {a.weight}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
