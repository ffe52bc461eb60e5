"""Cost of `diagnose`'s forward-only statistics against a plain forward pass over the same tokens,
and peak memory of the statistics pass as the token count grows (it must stay flat). Times are
process CPU time (all threads), which a busy machine disturbs far less than wall-clock time.

    python benchmarks/bench_diagnose.py [--tokens 65536] [--memory 100000,1000000]

Model: the `small` preset architecture (12 layers, d_model 128, context 128), random weights — the
cost does not depend on training. The timing interleaves plain and statistics passes (3 rounds);
memory is the peak resident set of a fresh process per token count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from workbench.analysis.depth import residual_statistics
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.presets import PRESETS


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(norm="pre-ln", **PRESETS["small"].model)).eval()


def batches(model: GPT, n_tokens: int, batch_size: int = 8):
    n = max(1, n_tokens // (model.cfg.n_ctx * batch_size))
    g = torch.Generator().manual_seed(0)
    for _ in range(n):  # generated lazily: the token count must not cost memory by itself
        yield torch.randint(0, model.cfg.d_vocab, (batch_size, model.cfg.n_ctx), generator=g)


def timing(n_tokens: int) -> dict:
    model = small_model()
    data = list(batches(model, n_tokens))
    plain, stats = [], []
    with torch.no_grad():
        model(data[0], return_type=None)  # warm-up
        for _ in range(3):
            t = time.process_time()
            for b in data:
                model(b, return_type=None)
            plain.append(time.process_time() - t)
            t = time.process_time()
            residual_statistics(model, data, far=4)
            stats.append(time.process_time() - t)
    p, s = statistics.median(plain), statistics.median(stats)
    return {"tokens": sum(b.numel() for b in data), "plain_s": p, "statistics_s": s, "ratio": s / p}


def memory_child(n_tokens: int) -> None:
    model = small_model()
    residual_statistics(model, batches(model, n_tokens), far=4)
    print(json.dumps({"tokens": n_tokens, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--memory", default="100000,1000000")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args.child)
        return
    t = timing(args.tokens)
    print(f"forward-only statistics: {t['statistics_s']:.2f} s vs plain forward {t['plain_s']:.2f} s "
          f"over {t['tokens']} tokens -> {t['ratio']:.3f}x")
    for n in (int(x) for x in args.memory.split(",")):
        r = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"peak RSS with {n:>9} tokens: {m['max_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
