"""How a pretrained model reaches the analyses: TransformerLens 4.3's TransformerBridge (what the workbench
used for Hugging Face models before the one-surface change) against the family adapter that loads the
checkpoint into the workbench's own hooked GPT — on SmolLM2-135M, side by side in one process.

    python benchmarks/bench_surface.py [--tokens 256] [--repeats 5] [--before DIR] [--out FILE.json]

Per implementation: max |logit − transformers' logit| on the same GGUF weights; whether the final
norm's scale is a hook point that can be replaced (``ln_final.hook_scale``); whether ``hook_z`` is
per head; wall time of a forward pass, of ``run_with_cache`` and of ``diagnose``'s residual
statistics over the same batches (medians of interleaved repeats). With ``--before DIR`` (a checkout of
the commit before the change, e.g. ``git worktree add /tmp/before a1644b2``) it also times ``workbench
diagnose smollm2`` end to end with the old code and the new, each in a fresh process, same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def diagnose_cli(code_dir: str | None, tokens: int, n_ctx: int | None = None) -> float:
    """Wall seconds of `diagnose(load("smollm2"), tokens)` in a fresh process running ``code_dir``'s code
    (``n_ctx``: the new code's working context; both default to 256-token windows on SmolLM2)."""
    prog = ("import sys, time; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None\n"
            "import workbench; from workbench.analysis.depth import diagnose\n"
            "kw = {'n_ctx': int(sys.argv[3])} if sys.argv[3] else {}\n"
            "m = workbench.load('smollm2', **kw); t0 = time.perf_counter()\n"
            "diagnose(m, tokens=int(sys.argv[2])); print(time.perf_counter() - t0)")
    r = subprocess.run([sys.executable, "-c", prog, code_dir or "", str(tokens), str(n_ctx or "")], capture_output=True,
                       text=True, check=True, cwd=code_dir or None)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import workbench
    from workbench.analysis.depth import residual_statistics
    from workbench.loader.hub import SMOLLM2_GGUF, SMOLLM2_HF_NAME, smollm2_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence (batch of 4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", help="a checkout of the code before the change, for the diagnose comparison")
    ap.add_argument("--diagnose-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    bridge = TransformerBridge.boot_transformers(SMOLLM2_HF_NAME, hf_model=hf, tokenizer=tok)
    ours = workbench.load("smollm2")
    tokens = torch.randint(0, ours.cfg.d_vocab, (4, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits

    rows = []
    for name, model in (("TL 4.3 TransformerBridge", bridge), ("workbench surface (llama adapter)", ours)):
        with torch.no_grad():
            logits = model(tokens, return_type="logits")
            _, cache = model.run_with_cache(tokens)
        hooks = set(model.hook_dict)
        z = cache["blocks.0.attn.hook_z"] if "blocks.0.attn.hook_z" in cache else None
        scale_replaceable = False
        if "ln_final.hook_scale" in hooks:
            seen = {}
            with torch.no_grad(), model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda s, hook: s * 2)]):
                seen["x"] = model(tokens, return_type="logits")
            scale_replaceable = not torch.allclose(seen["x"], logits)
        del cache
        rows.append({
            "model": name,
            "max_abs_logit_diff_vs_transformers": (logits - ref).abs().max().item(),
            "hook_points": len(hooks),
            "ln_final.hook_scale": "ln_final.hook_scale" in hooks, "hook_scale_replaceable": scale_replaceable,
            "hook_z_shape": list(z.shape) if z is not None else None,
            "forward_s": timed(lambda m=model: torch.no_grad()(m)(tokens, return_type="logits"), args.repeats),
            "run_with_cache_s": timed(lambda m=model: torch.no_grad()(m.run_with_cache)(tokens), args.repeats),
            "resid_stats_s": timed(lambda m=model: residual_statistics(m, [tokens]), args.repeats)
            if "blocks.0.ln1.hook_scale" in hooks else None,
        })
    rows.append({"model": "transformers LlamaForCausalLM (no hooks)",
                 "forward_s": timed(lambda: torch.no_grad()(hf)(input_ids=tokens), args.repeats)})
    base = rows[0]["forward_s"]
    for r in rows:
        r["forward_vs_bridge"] = base / r["forward_s"]
    print(json.dumps(rows, indent=1), flush=True)
    diag = None
    if args.before:
        before, after, longer = [], [], []
        for _ in range(2):  # interleaved, so drift in machine load hits all three alike
            before.append(diagnose_cli(args.before, args.diagnose_tokens))
            after.append(diagnose_cli(None, args.diagnose_tokens))
            longer.append(diagnose_cli(None, args.diagnose_tokens, n_ctx=1024))
        diag = {"tokens": args.diagnose_tokens, "before_s (bridge, 256-token windows)": before,
                "after_s (surface, default 256-token windows)": after, "after_s (surface, n_ctx=1024)": longer,
                "speedup": min(before) / min(after), "speedup_1024_windows": min(before) / min(longer)}
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "batch": list(tokens.shape), "repeats": args.repeats}
    print(json.dumps({"rows": rows, "diagnose": diag, "info": info}, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "diagnose": diag, "info": info}, indent=2))


if __name__ == "__main__":
    main()
