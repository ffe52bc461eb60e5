"""Window by window: the validation CE of a remove-ln directory, its control, the original and the stock
reload (transformers, with the sink prefix as its cache when the directory has one), the KL from the original
to the norm-free model and to the control, and where each overflowing window first grows past 1e5.

    python analyses/sink_windows.py runs/smol/S5 [--original smollm2] [--control DIR] [--corpus english] [--json]
    python analyses/sink_windows.py runs/smol/S12r --random 256 [--seed 2]   # windows of random tokens

``--control`` names another run's control, for an ablation run with ``--no-control`` on the same batches
(its summary's batch hash must equal that run's: checked).

A norm-free model that overflows on a few windows has a NaN mean CE; this gives the mean over the windows
every model keeps finite (the same windows for all four), how many did not, and the token and layer at
which each of them broke (docs/ln_removal.md, fifth session).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import workbench
from workbench.batches import load_token_data
from workbench.model import sink
from workbench.model.gpt import lm_cross_entropy
from workbench.removal.losses import kl_to_teacher
from workbench.removal.robustness import random_windows

BLOWN = 1e5  # a residual entry this large: the window is overflowing (the models' entries stay below ~5e3)


@torch.no_grad()
def first_blow_up(model, window: torch.Tensor, original=None) -> dict | None:
    """The first layer and position whose residual exceeds ``BLOWN`` (None if none does), and the RMS of that
    position's residual after each block up to there — in the norm-free model and in ``original``, whose
    growth there tells a runaway (layer by layer) from a circuit firing (one layer)."""
    names = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")
    resid = lambda m: m.run_with_cache(window[None], names_filter=lambda n: n.endswith(names))[1]  # noqa: E731
    cache = resid(model)
    shift = 1 if model.sink_token is not None else 0  # behind a prefix the hooks start at position 1
    for layer in range(model.cfg.n_layers):
        peak = torch.nan_to_num(cache[f"blocks.{layer}.hook_resid_post"][0].abs().amax(-1), nan=math.inf)
        if peak.max() > BLOWN:
            pos = int(peak.argmax()) + shift
            rms = lambda c, s, h="hook_resid_post": [c[f"blocks.{k}.{h}"][0, pos - s].pow(2).mean().sqrt().item()  # noqa: E731
                                                     for k in range(layer + 1)]
            loudest = []  # (token position, RMS) of the window's loudest position after each block
            for k in range(layer + 1):
                r = torch.nan_to_num(cache[f"blocks.{k}.hook_resid_post"][0].pow(2).mean(-1).sqrt(), nan=math.inf)
                loudest.append((int(r.argmax()) + shift, r.max().item()))
            return {"layer": layer, "pos": pos, "text": model.to_string(window[max(0, pos - 3): pos + 1]),
                    "rms": rms(cache, shift), "rms_original": rms(resid(original), 0) if original is not None else None,
                    # which sublayer writes the growth, and whether another position was loud first
                    "attn_rms": rms(cache, shift, "hook_attn_out"), "mlp_rms": rms(cache, shift, "hook_mlp_out"),
                    "window_loudest": loudest}
    return None


@torch.no_grad()
def window_table(directory: str, original: str, corpus: str, control: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    d = Path(directory)
    c = d / "control" if control is None else Path(control)
    if control is not None:
        if not (c.parent / "summary.json").is_file():
            print(f"error: {c} is not the control of a remove-ln run (no summary.json beside it); name DIR/control",
                  file=sys.stderr)
            raise SystemExit(2)
        ours = json.loads((d / "summary.json").read_text())["batches"]["removal"]
        theirs = json.loads((c.parent / "summary.json").read_text())["batches"]["control"]
        if ours != theirs:
            print(f"error: {c} was fine-tuned on other batches ({theirs}) than {d} ({ours}); name the control of a "
                  "run with the same --tokens-per-step, steps and seed", file=sys.stderr)
            raise SystemExit(2)
    models = {"ln_free": workbench.load(d), "control": workbench.load(c), "original": workbench.load(original)}
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    stock = sink.stock_forward(hf, d)
    free = models["ln_free"]
    data = load_token_data(corpus, free.cfg.d_vocab, tokenizer=free.tokenizer)
    n_ctx = json.loads((d / "summary.json").read_text())["n_ctx"]
    rows, per_pos = [], []
    for b in data.val_batches(16, 8, n_ctx):  # remove-ln's own validation windows
        logits = {k: m(b).float() for k, m in models.items()}
        logits["stock"] = stock(b).float()
        tok = {k: lm_cross_entropy(v, b, per_token=True) for k, v in logits.items()}
        per_pos.append(tok["ln_free"] - tok["control"])
        ce = {k: v.mean(1).tolist() for k, v in tok.items()}
        for k in ("ln_free", "control"):  # KL(original ‖ model) per window, mean over its positions
            ce[f"kl_{k}"] = [kl_to_teacher(logits["original"][i:i + 1], logits[k][i:i + 1]).item() for i in range(len(b))]
        rows += [({k: v[i] for k, v in ce.items()}, b[i]) for i in range(len(b))]
    finite = [r for r, _ in rows if all(math.isfinite(x) and x < 30 for x in r.values())]
    mean = {k: sum(r[k] for r in finite) / len(finite) for k in finite[0]}
    broken = [first_blow_up(free, w, models["original"]) for r, w in rows if not (math.isfinite(r["ln_free"]) and r["ln_free"] < 30)]
    return {"windows": len(rows), "finite": len(finite), "mean_ce_finite": mean,
            "delta_vs_control": mean["ln_free"] - mean["control"], "delta_vs_original": mean["ln_free"] - mean["original"],
            "delta_by_position": by_position(torch.cat(per_pos), [r for r, _ in rows]), "overflowing": broken}


def by_position(delta: torch.Tensor, rows: list[dict], edges=(1, 2, 4, 16, 64)) -> list[dict]:
    """The norm-free model's CE minus the control's per predicted position (``delta``: window × position,
    position p predicting token p + 1), averaged over the finite windows in buckets of positions from each
    edge to the next: where in a window the gap sits."""
    ok = torch.tensor([all(math.isfinite(x) and x < 30 for x in r.values()) for r in rows])
    d = delta[ok]
    bounds = [*edges, d.shape[1]]
    return [{"from": lo, "to": hi - 1, "delta": d[:, lo:hi].mean().item()} for lo, hi in zip(bounds, bounds[1:])]


@torch.no_grad()
def long_windows(directory: str, original: str, corpus: str, length: int, count: int = 4) -> dict:
    """CE of the stock reload (with its prefix) and of the original on ``count`` held-out windows of
    ``length`` tokens — longer than the export's working context, which RoPE does not bound (issue 24,
    item 6: the Ranker's 1024)."""
    from transformers import AutoModelForCausalLM

    d = Path(directory)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    stock = sink.stock_forward(hf, d)
    orig = workbench.load(original, n_ctx=length)
    data = load_token_data(corpus, orig.cfg.d_vocab, tokenizer=orig.tokenizer)
    rows = []
    for w in data.val_batches(count, 1, length):
        free = lm_cross_entropy(stock(w).float(), w).item()
        rows.append({"ln_free": free, "original": lm_cross_entropy(orig(w).float(), w).item()})
    return {"length": length, "windows": rows, "finite": sum(math.isfinite(r["ln_free"]) and r["ln_free"] < 30 for r in rows)}


@torch.no_grad()
def random_finite(directory: str, corpus: str, count: int, seed: int) -> dict:
    """How many of ``count`` windows of uniformly random tokens (behind the document-start token, as every
    window) the norm-free model keeps finite, and its CE there (seed 0 is remove-ln's robustness probe and
    seed 1 repair-vocab's search: a held-out check uses another)."""
    d = Path(directory)
    free = workbench.load(d)
    n_ctx = json.loads((d / "summary.json").read_text())["n_ctx"]
    first = load_token_data(corpus, free.cfg.d_vocab, tokenizer=free.tokenizer).val_batches(1, 1, n_ctx)[0][0, 0]
    w = random_windows(free.cfg.d_vocab, count, n_ctx, first, seed)
    ce = torch.cat([lm_cross_entropy(free(b).float(), b, per_token=True).mean(1) for b in w.split(8)])
    ok = torch.isfinite(ce) & (ce < 30)
    return {"windows": count, "finite": int(ok.sum()), "seed": seed, "mean_ce_finite": ce[ok].mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--original", default="smollm2")
    p.add_argument("--control", default=None, help="another run's control directory (default: DIR/control)")
    p.add_argument("--corpus", default="english")
    p.add_argument("--long", type=int, default=0, help="instead: the stock reload's CE on 4 held-out windows this long")
    p.add_argument("--random", type=int, default=0, help="instead: how many of N random-token windows stay finite")
    p.add_argument("--seed", type=int, default=2, help="seed of --random's windows (default 2: held out)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.random:
        t = random_finite(a.directory, a.corpus, a.random, a.seed)
        print(f"{t['finite']} of {t['windows']} random-token windows finite (seed {t['seed']}); CE there "
              f"{t['mean_ce_finite']:.3f}")
        return
    if a.long:
        t = long_windows(a.directory, a.original, a.corpus, a.long)
        for r in t["windows"]:
            print(f"{t['length']} tokens: norm-free (stock reload) {r['ln_free']:.4f}, original {r['original']:.4f}")
        print(f"{t['finite']} of {len(t['windows'])} long windows finite")
        return
    t = window_table(a.directory, a.original, a.corpus, a.control)
    if a.json:
        print(json.dumps(t, indent=1))
        return
    m = t["mean_ce_finite"]
    print(f"{t['finite']} of {t['windows']} windows finite; CE there: norm-free {m['ln_free']:.4f}, stock reload "
          f"{m['stock']:.4f}, control {m['control']:.4f}, original {m['original']:.4f}; Δ vs control "
          f"{t['delta_vs_control']:+.3f}, vs original {t['delta_vs_original']:+.3f}; KL to the original: norm-free "
          f"{m['kl_ln_free']:.4f}, control {m['kl_control']:.4f}")
    print("Δ vs control by predicted position: " + ", ".join(f"{r['from']}–{r['to']}: {r['delta']:+.3f}"
                                                          for r in t["delta_by_position"]))
    for b in t["overflowing"]:
        if b is None:
            print("  overflows (no entry > 1e5)")
            continue
        print(f"  overflows: layer {b['layer']}, position {b['pos']} ({b['text']!r}); its RMS after each block, "
              f"norm-free / original:")
        print("    " + " ".join(f"{x:.3g}/{y:.2g}" for x, y in zip(b["rms"], b["rms_original"])))
        print("    what each block writes there, attention / MLP (RMS): " + " ".join(
            f"{a:.2g}/{m:.2g}" for a, m in zip(b["attn_rms"], b["mlp_rms"])))
        print("    the window's loudest position after each block, position:RMS (a runaway elsewhere that attention "
              "copies): " + " ".join(f"{p}:{x:.3g}" for p, x in b["window_loudest"]))


if __name__ == "__main__":
    main()
