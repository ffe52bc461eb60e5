"""One AdamW step over SmolLM2-135M's parameter shapes (134.5 M parameters, its two weight-decay groups):
torch's per-tensor loop (the CPU default before), its foreach path and its fused kernel (what
``workbench.optim.adamw`` builds now), interleaved A B C × repeats so machine drift hits all alike.

    python benchmarks/bench_optimizer.py [--repeats 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

# SmolLM2-135M: embedding 49152 × 576 (tied), 30 blocks of Q, O 576², K, V 192 × 576, gate/up/down 1536 × 576,
# two RMSNorm gains per block and the final one.
SHAPES = [(49152, 576)] + [(576, 576), (576, 576), (192, 576), (192, 576)] * 30 + [(1536, 576)] * 90
GAINS = [(576,)] * 61
KINDS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def optimizer(kind: str) -> torch.optim.AdamW:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES + GAINS]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    groups = [{"params": params[:len(SHAPES)], "weight_decay": 0.1}, {"params": params[len(SHAPES):], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-5, betas=(0.9, 0.95), **KINDS[kind])
    opt.step()  # the moments exist from here on, as in a run
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            opt = optimizer(kind)
            t0 = time.perf_counter()
            opt.step()
            times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>10}: median {med[k]:.3f} s/step  (× per-tensor {med['per-tensor'] / med[k]:.2f})  "
              + " ".join(f"{t:.3f}" for t in v))
    if args.out:
        json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "seconds": times, "median": med}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
