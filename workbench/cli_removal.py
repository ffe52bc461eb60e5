"""CLI commands of LayerNorm removal: ``remove-ln``, ``convert`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path



def add_parsers(sub) -> None:
    r = sub.add_parser("remove-ln", help="remove every norm by fine-tuning (frozen-std fake norms, one at a time)")
    r.add_argument("model", help="run directory, Hugging Face directory (GPT-2, Llama, Qwen2, GPT-NeoX), smollm2 or hf:NAME")
    r.add_argument("--out", required=True, help="directory to create: LN-free model, control/, summary.json")
    r.add_argument("--steps-per-ln", type=int, default=None, help="fine-tuning steps after each norm (K)")
    r.add_argument("--tokens-per-step", type=int, default=None, help="tokens per optimizer step (T)")
    r.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass (gradient accumulation)")
    r.add_argument("--final-steps", type=int, default=None, help="cool-down steps after the last removal (default 0)")
    r.add_argument("--sigma", default="rms",
                   help="frozen std from the ordinary tokens' scales: rms (pooled std), median, or qNN (percentile)")
    r.add_argument("--special-positions", type=int, default=1,
                   help="the first N positions keep their own std until the end (default 1: BOS)")
    r.add_argument("--aux-loss", type=float, default=0.0, help="weight of the final-residual std loss (default 0)")
    r.add_argument("--scale-loss", type=float, default=0.0,
                   help="weight of a loss on the spread of log per-token scale at every norm (default 0)")
    r.add_argument("--precondition", type=int, default=0,
                   help="steps with --scale-loss and every norm live before the first is frozen (default 0)")
    r.add_argument("--ema", type=float, default=None, help="EMA rate of the frozen std while fine-tuning (0 = fixed)")
    r.add_argument("--lr", type=float, help="learning rate (default: 0.4 × the pre-training peak; 2e-5 for Llama models)")
    r.add_argument("--corpus", help="fine-tuning text (default: the model's training corpus, else english)")
    r.add_argument("--ramp", type=int, default=0,
                   help="hand each norm over from its live scale to the frozen one over R steps (default 0: at once)")
    r.add_argument("--split-mlp", action="store_true",
                   help="gated MLPs: freeze the up path's norm first and keep the gate's live until last")
    r.add_argument("--mlp-penalty", type=float, default=0.0,
                   help="weight of a one-sided penalty on per-position scales above (1+δ)·σ at MLP-norm inputs "
                   "not yet frozen (default 0)")
    r.add_argument("--penalty-delta", type=float, default=0.1, help="δ of --mlp-penalty (default 0.1)")
    r.add_argument("--bridge", default="none", help="hand-over to the frozen scale: none, clip (only positions "
                   "above σ stay normalized, annealed away) or taper (outputs blended, cosine to 0)")
    r.add_argument("--bridge-steps", type=int, default=0, help="steps over which --bridge is annealed away")
    r.add_argument("--special-steps", type=int, default=0,
                   help="hand the special positions (BOS, EOT) over to the shared σ over N steps (default 0: at once)")
    r.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint to OUT.partial every N steps (default 50; 0: off); the same "
                   "command resumes it")
    r.add_argument("--trace", help="also write the schedule and per-step metrics (loss, resid_max, …) to this JSON "
                   "file, and when the run diverges: how far it got and where the residual grew")
    r.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP2) instead of DDP")
    r.add_argument("--no-control", action="store_true", help="skip the control run (LN kept)")
    r.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    r.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (default: bfloat16 autocast where the "
                   "device has native bf16, else float32)")
    r.add_argument("--quiet", action="store_true")

    c = sub.add_parser("convert", help="exact training-free transforms of a Pre-LN model")
    c.add_argument("model", help="a Pre-LN model: run directory, GPT-2 or GPT-NeoX Hugging Face directory")
    c.add_argument("--to", required=True, help="folded | pre-rms | pre-crms")
    c.add_argument("--out", required=True)
    c.add_argument("--corpus", default="english", help="validation text for max_abs_logit_diff")

    e = sub.add_parser("export", help="write a model as a stock Hugging Face directory of its family")
    e.add_argument("model", help="run directory (pre-ln or LN-free: GPT-2; Llama/Qwen2 runs: their family)")
    e.add_argument("--out", required=True)


def _removal_config(args):
    from .removal import RemovalConfig

    given = {"steps_per_ln": args.steps_per_ln, "tokens_per_step": args.tokens_per_step, "lr": args.lr,
             "ema": args.ema, "final_steps": args.final_steps, "micro_batch": args.micro_batch,
             "checkpoint_every": args.checkpoint_every}
    return RemovalConfig(**{k: v for k, v in given.items() if v is not None}, aux_loss=args.aux_loss, sigma=args.sigma,
                         special_positions=args.special_positions,
                         control=not args.no_control, fsdp=args.fsdp, ramp=args.ramp,
                         scale_loss=args.scale_loss, precondition=args.precondition, dtype=args.dtype,
                         split_mlp=args.split_mlp, mlp_penalty=args.mlp_penalty, penalty_delta=args.penalty_delta,
                         bridge=args.bridge, bridge_steps=args.bridge_steps, special_steps=args.special_steps)


def cmd_remove_ln(args) -> int:
    from .removal import remove_ln

    from . import io
    from .removal.finetune import Diverged

    rc = _removal_config(args)
    if args.trace and (Path(args.trace).is_dir() or not Path(args.trace).resolve().parent.is_dir()):
        from .errors import WorkbenchError

        raise WorkbenchError(f"--trace {args.trace}: give a file in an existing directory")
    try:
        s = remove_ln(args.model, args.out, rc, corpus=args.corpus, device=args.device, progress=not args.quiet)
    except Diverged as e:
        if args.trace:
            io.atomic_write_json(Path(args.trace), {"diverged": str(e), "schedule": e.schedule, "metrics": e.metrics})
        raise
    if args.trace:
        metrics = [json.loads(line) for line in (Path(args.out) / io.METRICS_FILE).read_text().splitlines()]
        io.atomic_write_json(Path(args.trace), {"diverged": None, "schedule": s["schedule"], "metrics": metrics})
    if s["first_overflow_step"] is not None:
        print(f"note: the first non-finite step was {s['first_overflow_step']}, after {s['norms_frozen_before_overflow']}"
              f" of {s['norms_total']} norms were frozen (skipped steps: {s['skipped_steps']})")
    frac = f" ({100 * s['token_fraction']:.2f}% of pre-training)" if s.get("token_fraction") else ""
    print(f"CE original {s['ce_original']:.4f}  control {_f(s['ce_control'])}  LN-free {s['ce_ln_free']:.4f}"
          f"  | {s['tokens_used']} fine-tuning tokens{frac}")
    print(f"wrote {args.out} (summary.json; the control model in {Path(args.out) / 'control'})")
    return 0


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def cmd_convert(args) -> int:
    from .removal.api import convert_to_dir

    s = convert_to_dir(args.model, args.to, args.out, corpus=args.corpus)
    print(json.dumps(s, indent=2))
    return 0


def cmd_export(args) -> int:
    import workbench

    from .loader import export

    s = export(workbench.load(args.model), args.out)
    print(json.dumps(s, indent=2))
    print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


COMMANDS = {"remove-ln": cmd_remove_ln, "convert": cmd_convert, "export": cmd_export}
