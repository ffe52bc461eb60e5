"""Training throughput (tokens/s) of the workbench `pre-ln` model with idle hooks, side by side with
(a) the same architecture as plain PyTorch modules and (b) TransformerLens 4.3's
TransformerBridge.boot_native (normalization_type "LN").

    python benchmarks/bench_train_throughput.py [--steps 20] [--repeats 3] [--out FILE.json]

One process, the three models interleaved (A B C, A B C, ...) so drift in machine load hits all
three alike; each timed block is forward + backward + AdamW step on the same random batch shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_gpt import plain_from_workbench  # noqa: E402

SIZE = dict(n_layers=6, d_model=256, n_heads=8, n_ctx=256, d_vocab=4096)
BATCH = 8


def build():
    from workbench.config import ModelConfig
    from workbench.model import GPT
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401  (registers boot_native)

    torch.manual_seed(0)
    ours = GPT(ModelConfig(norm="pre-ln", **SIZE))
    plain = plain_from_workbench(ours)
    bridge = TransformerBridge.boot_native(dict(
        n_layers=SIZE["n_layers"], d_model=SIZE["d_model"], n_heads=SIZE["n_heads"],
        d_head=SIZE["d_model"] // SIZE["n_heads"], d_mlp=4 * SIZE["d_model"], n_ctx=SIZE["n_ctx"],
        d_vocab=SIZE["d_vocab"], normalization_type="LN", act_fn="gelu_new", seed=0))
    return {
        "workbench pre-ln (hooks idle)": (ours, lambda m, t: m(t, return_type="loss")),
        "plain PyTorch": (plain, lambda m, t: m(t[:, :-1], t[:, 1:])),
        "TL 4.3 TransformerBridge.boot_native": (bridge, lambda m, t: m(t, return_type="loss")),
    }


def time_block(model, loss_fn, opt, tokens, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed blocks per model")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    models = build()
    tokens = torch.randint(0, SIZE["d_vocab"], (BATCH, SIZE["n_ctx"]))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in models.items()}
    for k, (m, fn) in models.items():  # warm-up: allocator, kernels, lazy init
        m.train()
        time_block(m, fn, opts[k], tokens, 2)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, (m, fn) in models.items():
            times[k].append(time_block(m, fn, opts[k], tokens, args.steps))
    tokens_per_block = args.steps * BATCH * SIZE["n_ctx"]
    base = statistics.median(times["plain PyTorch"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"model": k, "tokens_per_s": tokens_per_block / med, "vs_plain": base / med,
                     "block_seconds": [round(t, 3) for t in ts]})
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "size": SIZE, "batch": BATCH, "steps_per_block": args.steps, "repeats": args.repeats}
    print(f"| model | tokens/s | × plain PyTorch |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens_per_s']:.0f} | {r['vs_plain']:.3f} |")
    print(json.dumps(info))
    if args.out:
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
