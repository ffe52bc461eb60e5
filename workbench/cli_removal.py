"""CLI commands of LayerNorm removal: ``remove-ln``, ``repair-vocab``, ``convert``, ``truncate`` and ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .errors import WorkbenchError
from .removal.recipes import RECIPES, fields_asked



def add_parsers(sub) -> None:
    from .removal.repair import VocabRepair

    r = sub.add_parser("remove-ln", help="remove every norm by fine-tuning (frozen-std fake norms, one at a time)")
    r.add_argument("model", help="run directory, Hugging Face directory (GPT-2, Llama, Qwen2, GPT-NeoX), smollm2 or hf:NAME")
    r.add_argument("--out", help="directory to create: LN-free model, control/, summary.json (required unless "
                   "--explain)")
    r.add_argument("--corpus", help="fine-tuning text (default: the model's training corpus, else english)")
    r.add_argument("--recipe", default=argparse.SUPPRESS,
                   help=f"the method's defaults: auto (by capability), {', '.join(RECIPES)}; flags override single fields")
    r.add_argument("--explain", action="store_true",
                   help="print the resolved method (every field and where its value came from) and exit")
    _method_flags(r)
    r.add_argument("--trace", help="also write the schedule and per-step metrics (loss, resid_max, …) to this JSON "
                   "file, and when the run diverges: how far it got and where the residual grew")
    r.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    r.add_argument("--quiet", action="store_true")

    v = sub.add_parser("repair-vocab", help="shrink the embedding rows of the tokens a norm-free model runs away "
                       "on (remove-ln's output), into a new directory")
    v.add_argument("run", help="a remove-ln --out directory (norm-free model, summary.json, control/)")
    v.add_argument("--out", required=True, help="directory to create")
    _flags(v, dataclasses.fields(VocabRepair))

    c = sub.add_parser("convert", help="exact training-free transforms of a Pre-LN model")
    c.add_argument("model", help="a Pre-LN model: run directory, GPT-2 or GPT-NeoX Hugging Face directory")
    c.add_argument("--to", required=True, help="folded | pre-rms | pre-crms")
    c.add_argument("--out", required=True)
    c.add_argument("--corpus", default="english", help="validation text for max_abs_logit_diff")

    t = sub.add_parser("truncate", help="a model's first N blocks + final norm + unembedding (a cheaper removal test bed)")
    t.add_argument("model", help="any model workbench loads: run directory, Hugging Face directory, smollm2")
    t.add_argument("--layers", type=int, required=True, help="blocks to keep (1 … the model's depth)")
    t.add_argument("--out", required=True, help="run directory to create")
    t.add_argument("--corpus", default="english", help="validation text the cut is checked on")

    e = sub.add_parser("export", help="write a model as a stock Hugging Face directory of its family")
    e.add_argument("model", help="run directory (pre-ln or LN-free: GPT-2; Llama/Qwen2 runs: their family)")
    e.add_argument("--out", required=True)


_TYPES = {"int": int, "float": float, "str": str}


def _method_flags(parser) -> None:
    """One flag per RemovalConfig field that has help: name, type, default and help all from the field.
    Unset flags are absent from the namespace, so the recipe (or the field's default) decides them."""
    from .removal import RemovalConfig

    _flags(parser, [f for _, f in RemovalConfig.fields()])


def _flags(parser, fields) -> None:
    for f in fields:
        if "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        help_text = f.metadata["help"].replace("%", "%%")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                default=argparse.SUPPRESS, help=help_text)
            continue
        if f.default is not None and "default" not in help_text:
            help_text += f" (default {f.default})"
        kind = _TYPES[f.type.split(" | ")[0]]
        parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


def _method_options(args) -> dict:
    from .removal import RemovalConfig

    return {f.name: getattr(args, f.name) for _, f in RemovalConfig.fields() if hasattr(args, f.name)}


def cmd_remove_ln(args) -> int:
    from .removal import RemovalConfig, remove_ln

    from . import io
    from .removal.finetune import Diverged

    options, recipe = _method_options(args), getattr(args, "recipe", None)
    RemovalConfig.of(**{**fields_asked(recipe), **options})  # a bad value fails here, before the model is loaded
    if args.explain:
        from .removal.api import explain_method

        print(explain_method(args.model, options, recipe))
        return 0
    if args.out is None:
        raise WorkbenchError("remove-ln needs --out DIR (the directory to create), or --explain to only print the method")
    if args.trace and (Path(args.trace).is_dir() or not Path(args.trace).resolve().parent.is_dir()):
        raise WorkbenchError(f"--trace {args.trace}: give a file in an existing directory")
    try:
        s = remove_ln(args.model, args.out, corpus=args.corpus, device=args.device, progress=not args.quiet,
                      options=options, recipe=recipe)
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
    control = f"; the control model in {Path(args.out) / 'control'}" if s["ce_control"] is not None else ""
    print(f"wrote {args.out} (summary.json{control})")
    return 0


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def cmd_convert(args) -> int:
    from .removal.api import convert_to_dir

    s = convert_to_dir(args.model, args.to, args.out, corpus=args.corpus)
    print(json.dumps(s, indent=2))
    return 0


def cmd_truncate(args) -> int:
    from .removal.api import truncate_to_dir

    s = truncate_to_dir(args.model, args.layers, args.out, corpus=args.corpus)
    print(json.dumps(s, indent=2))
    return 0


def cmd_repair_vocab(args) -> int:
    from .removal.api import repair_to_dir
    from .removal.repair import VocabRepair

    names = [f.name for f in dataclasses.fields(VocabRepair) if hasattr(args, f.name)]
    cfg = VocabRepair(**{n: getattr(args, n) for n in names})  # a bad value fails here, before any loading
    s = repair_to_dir(args.run, args.out, cfg)
    r = s["vocab_repair"]
    left = "" if r["converged"] else f"; {len(r['still_running_away'])} still run away after {cfg.rounds} rounds"
    print(f"repaired {r['repaired']} tokens' embedding rows{left}; CE {_f(r['ce_before'])} -> {_f(s['ce_ln_free'])}"
          f" (control {_f(s.get('ce_control'))}, stock reload {_f(s['ce_stock_reload'])})")
    print(f"wrote {args.out} (summary.json: vocab_repair lists every token, its ratio before and after)")
    return 0


def cmd_export(args) -> int:
    from .loader import export, load

    s = export(load(args.model), args.out)
    print(json.dumps(s, indent=2))
    print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


COMMANDS = {"remove-ln": cmd_remove_ln, "repair-vocab": cmd_repair_vocab, "convert": cmd_convert, "export": cmd_export,
            "truncate": cmd_truncate}
