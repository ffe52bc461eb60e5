"""Training throughput (tokens/s) of the workbench `pre-ln` model with idle hooks, side by side with
(a) the same architecture as plain PyTorch modules and (b) TransformerLens 4.3's
TransformerBridge.boot_native (normalization_type "LN"), in float32 and in bfloat16 autocast.

    python benchmarks/bench_train_throughput.py [--size bench|tiny|small|medium] [--steps 20] [--repeats 3]
                                                [--dtypes float32,bfloat16] [--out FILE.json]

One process, every (model, dtype) interleaved (A B C …, A B C …) so drift in machine load hits all
alike; each timed block is forward + backward + AdamW step on the same random batch shape, the model
in float32 with the forward under ``workbench.precision.autocast`` (float32 master weights, the
trainer's path). MFU = achieved training FLOP/s (6·N per token for the matmul weights N plus
12·L·T·d for attention, the PaLM appendix B count) over the peak of a 2048² matmul in the same
dtype measured in this run.
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

SIZES = {  # the benchmark's historical size, and the presets' models with their batch sizes
    "bench": (dict(n_layers=6, d_model=256, n_heads=8, n_ctx=256, d_vocab=4096), 8),
}


def size(name: str) -> tuple[dict, int]:
    from workbench.presets import get_preset

    if name in SIZES:
        return SIZES[name]
    p = get_preset(name)
    return {k: p.model[k] for k in ("n_layers", "d_model", "n_heads", "n_ctx", "d_vocab")}, p.train["batch_size"]


def build(cfg: dict, tl: bool):
    from workbench.config import ModelConfig
    from workbench.model import GPT

    torch.manual_seed(0)
    ours = GPT(ModelConfig(norm="pre-ln", **cfg))
    models = {
        "workbench pre-ln (hooks idle)": (ours, lambda m, t: m(t, return_type="loss")),
        "plain PyTorch": (plain_from_workbench(ours), lambda m, t: m(t[:, :-1], t[:, 1:])),
    }
    if tl:
        from transformer_lens.model_bridge import TransformerBridge
        import transformer_lens.model_bridge.sources  # noqa: F401  (registers boot_native)

        bridge = TransformerBridge.boot_native(dict(
            n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"],
            d_head=cfg["d_model"] // cfg["n_heads"], d_mlp=4 * cfg["d_model"], n_ctx=cfg["n_ctx"],
            d_vocab=cfg["d_vocab"], normalization_type="LN", act_fn="gelu_new", seed=0))
        models["TL 4.3 TransformerBridge.boot_native"] = (bridge, lambda m, t: m(t, return_type="loss"))
    return models


def train_flops_per_token(cfg: dict) -> float:
    """6·N (N: every matmul weight, unembedding included) + 12·L·T·d (attention scores and mixing)."""
    d, L, T = cfg["d_model"], cfg["n_layers"], cfg["n_ctx"]
    n_matmul = L * 12 * d * d + d * cfg["d_vocab"]
    return 6 * n_matmul + 12 * L * T * d


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n×n matmuls in ``dtype`` (the roofline MFU is measured against)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_block(model, loss_fn, opt, tokens, steps: int, dtype: str) -> float:
    from workbench.precision import autocast

    start = time.perf_counter()
    for _ in range(steps):
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="bench", help="bench (6 layers, d_model 256) or a preset: tiny, small, medium")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed blocks per model")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-tl", action="store_true", help="leave TransformerLens out")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg, batch = size(args.size)
    dtypes = args.dtypes.split(",")
    models = build(cfg, tl=not args.no_tl)
    tokens = torch.randint(0, cfg["d_vocab"], (batch, cfg["n_ctx"]))
    runs = {(k, dt): (m, fn) for k, (m, fn) in models.items() for dt in dtypes
            if not (dt != "float32" and k.startswith("TL"))}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in models.items()}
    for (k, dt), (m, fn) in runs.items():  # warm-up: allocator, kernels, lazy init
        m.train()
        time_block(m, fn, opts[k], tokens, 2, dt)
    times: dict = {key: [] for key in runs}
    for _ in range(args.repeats):
        for (k, dt), (m, fn) in runs.items():
            times[(k, dt)].append(time_block(m, fn, opts[k], tokens, args.steps, dt))
    peaks = {dt: matmul_peak(getattr(torch, dt)) for dt in dtypes}
    tokens_per_block = args.steps * batch * cfg["n_ctx"]
    flops_token = train_flops_per_token(cfg)
    base = statistics.median(times[("plain PyTorch", "float32")]) if "float32" in dtypes else None
    ours32 = statistics.median(times[("workbench pre-ln (hooks idle)", "float32")]) if "float32" in dtypes else None
    rows = []
    for (k, dt), ts in times.items():
        med = statistics.median(ts)
        tps = tokens_per_block / med
        rows.append({"model": k, "dtype": dt, "tokens_per_s": tps, "vs_plain_fp32": base / med if base else None,
                     "vs_own_fp32": statistics.median(times[(k, "float32")]) / med if (k, "float32") in times else None,
                     "vs_workbench_fp32": ours32 / med if ours32 else None,
                     "mfu": tps * flops_token / peaks[dt], "block_seconds": [round(t, 3) for t in ts]})
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "size": args.size, "model": cfg, "batch": batch, "steps_per_block": args.steps, "repeats": args.repeats,
            "matmul_peak_tflops": {dt: round(p / 1e12, 3) for dt, p in peaks.items()},
            "train_flops_per_token": flops_token}
    print("| model | dtype | tokens/s | × its own float32 | × plain PyTorch float32 | MFU |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        own = f"{r['vs_own_fp32']:.2f}" if r["vs_own_fp32"] else "—"
        plain = f"{r['vs_plain_fp32']:.3f}" if r["vs_plain_fp32"] else "—"
        print(f"| {r['model']} | {r['dtype']} | {r['tokens_per_s']:.0f} | {own} | {plain} | {100 * r['mfu']:.1f}% |")
    print(json.dumps(info))
    if args.out:
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
