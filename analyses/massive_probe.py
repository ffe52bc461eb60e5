"""Does a model carry massive activations, and where? Per residual layer: the median token RMS, the
largest |entry| at position 0 and at positions ≥ 1 (as multiples of that median), the dimensions above
20× the median (workbench.analysis.depth's criterion), and how far the loudest ordinary token's scale
at each MLP-norm input sits above the median token's, and BOS's and end-of-text's mean scale — the
positions a frozen σ over-scales.

    python analyses/massive_probe.py zoo/small_swiglu/pre-rms zoo/small_seeds/pre-rms/seed0 [--tokens 8192]
"""

import argparse
import sys

import torch

import workbench
from workbench.analysis.depth import corpus_batches, residual_statistics
from workbench.tokenizer import EOT


@torch.no_grad()
def probe(spec: str, tokens: int) -> list[str]:
    model = workbench.load(spec)
    if model.sink_token is not None:  # norm-free behind a stored position 0: no norm scale, no position-0 residual
        print(f"error: {spec} has an attention-sink prefix and no norms; probe the model it was made from", file=sys.stderr)
        raise SystemExit(2)
    batches = corpus_batches(model, "english", tokens)
    stats = residual_statistics(model, batches)
    L = model.cfg.n_layers
    eot = model.tokenizer.token_to_id(EOT) if model.tokenizer is not None else None
    loud, bos, ends = [], [], []
    captured: dict[int, list[torch.Tensor]] = {l: [] for l in range(L)}
    hooks = [(f"blocks.{l}.ln2.hook_scale", lambda x, hook, l=l: captured[l].append(x[..., 0])) for l in range(L)]
    with model.hooks(fwd_hooks=hooks):
        for b in batches:
            model(b, return_type=None)
    tokens = torch.cat(batches)
    is_eot = tokens == eot
    is_eot[:, 0] = False
    ordinary = ~is_eot
    ordinary[:, 0] = False
    for l in range(L):
        s = torch.cat(captured[l]).float()
        med = s[ordinary].median()
        loud.append((s[ordinary].max() / med).item())
        bos.append((s[:, 0].mean() / med).item())
        ends.append((s[is_eot].mean() / med).item() if is_eot.any() else float("nan"))
    rows = [f"### {spec}", "", "| layer | median token RMS | max \\|x\\| pos 0 (× median) | max \\|x\\| pos ≥ 1 (× median) | "
            "massive dims (> 20×) | at ln2 (× median token scale): loudest ordinary / BOS / end-of-text |",
            "|---:|---:|---:|---:|---|---|"]
    for layer in stats["layers"]:
        i, med = layer["layer"], layer["resid_rms_median_token"]
        first = max((d["max_abs_first"] for d in layer["massive_dims"]), default=None)
        rest = max((d["max_abs_rest"] for d in layer["massive_dims"]), default=None)
        dims = ", ".join(str(d["dim"]) for d in layer["massive_dims"]) or "—"
        f = lambda v: "—" if v is None else f"{v / med:.0f}"  # noqa: E731
        rows.append(f"| {i} | {med:.3g} | {f(first)} | {f(rest)} | {dims} | {loud[i]:.1f} / {bos[i]:.1f} / {ends[i]:.1f} |"
                    if i < L else
                    f"| {i} (final) | {med:.3g} | {f(first)} | {f(rest)} | {dims} | — |")
    return rows + [""]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    for spec in args.models:
        print("\n".join(probe(spec, args.tokens)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
