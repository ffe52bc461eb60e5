"""CLI command of the Language Ranker: ``rank-languages``."""

from __future__ import annotations

from pathlib import Path

from .errors import WorkbenchError


def add_parsers(sub) -> None:
    r = sub.add_parser("rank-languages", help="Language Ranker: per-layer similarity to English on parallel text")
    r.add_argument("model", help="run directory, smollm2, a Hugging Face directory or hf:NAME")
    r.add_argument("--corpus", default="udhr", help="udhr (bundled), mix:LANG=SHARE,… (held-out text of a "
                   "synthetic mixture) or a JSON Lines file of UDHR-shaped records with English (default udhr)")
    r.add_argument("--langs", help="comma-separated corpus codes or ISO 639-3 codes (default: every language)")
    r.add_argument("--pooling", default="last", help="last | mean | weighted (position-weighted mean, as MEXA) "
                   "over the text's tokens (default last)")
    r.add_argument("--metric", default="both", help="cosine (Li et al.) | retrieval (MEXA: is the translation "
                   "the nearest English unit?) | both (default)")
    r.add_argument("--length-match", action="store_true", help="represent each unit and its English original by "
                   "their common number of tokens (a control for text length)")
    r.add_argument("--unit", default="article", help="article | paragraph (default article)")
    r.add_argument("--center", default="language", help="language (subtract each language's mean "
                   "representation; default) | none (raw cosine, as in Li et al.)")
    r.add_argument("--pairing", default="aligned", help="aligned | shuffled (a misaligned baseline)")
    r.add_argument("--max-units", type=int, help="use only the N shortest English units (default: all)")
    r.add_argument("--max-tokens", type=int, help="cut longer texts (left out of bits per byte; default: "
                   "the context, at most 1024 for Hugging Face models)")
    r.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass, padding included")
    r.add_argument("--dtype", default="float32", help="float32 | bfloat16 (about 2× faster on CPUs with bf16)")
    r.add_argument("--out", help="write FILE.json (and FILE.html: heat map + score vs bits per English byte)")
    r.add_argument("--top", type=int, default=25, help="rows of the printed ranking (default 25)")
    r.add_argument("--quiet", action="store_true")


def cmd_rank_languages(args) -> int:
    import torch

    from .io import atomic_write_json, atomic_write_text
    from .languages.figures import ranking_html
    from .languages.parallel import load_parallel
    from .languages.ranker import check_options, check_units, rank_languages, ranking_table
    from .loader import load

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise WorkbenchError(f"unknown dtype {args.dtype!r}; choose float32 or bfloat16")
    check_options(pairing=args.pairing, center=args.center, unit=args.unit, metric=args.metric, pooling=args.pooling)
    if args.max_units == 1:  # before the model loads
        check_units("every language with --max-units 1", 1, args.pairing, args.center, args.metric != "cosine")
    if args.top < 1:
        raise WorkbenchError(f"--top must be a positive number of rows, got {args.top}")
    if args.batch_tokens < 1 or (args.max_tokens is not None and args.max_tokens < 2):
        raise WorkbenchError("--batch-tokens must be ≥ 1 and --max-tokens ≥ 2")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".json":
        raise WorkbenchError(f"--out {out} must name a .json file")
    if out is not None and not out.parent.is_dir():
        raise WorkbenchError(f"the folder of --out {out} does not exist; create it first")
    corpus = load_parallel(args.corpus)  # bad corpus / languages fail before the model loads
    langs = [c.strip() for c in args.langs.split(",") if c.strip()] if args.langs else None
    corpus.resolve(langs, args.unit)
    model = load(args.model, n_ctx=args.max_tokens or 1024)  # rotary models: read texts this long
    if args.dtype != "float32":
        model.to(dtypes[args.dtype])
    result = rank_languages(model, corpus, langs, pooling=args.pooling, unit=args.unit, max_units=args.max_units,
                            pairing=args.pairing, center=args.center, batch_tokens=args.batch_tokens,
                            max_tokens=args.max_tokens, progress=not args.quiet, model_name=str(args.model),
                            metric=args.metric, length_match=args.length_match)
    result["dtype"] = args.dtype
    table = ranking_table(result)
    print(table.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    said = []
    for name in ("score", "retrieval"):
        if f"spearman_{name}_vs_bits_per_english_byte" in result:
            rho = result[f"spearman_{name}_vs_bits_per_english_byte"]
            said.append(f"Spearman({name}, bits per English byte) = "
                        + ("n/a (fewer than 3 languages)" if rho is None else f"{rho:.3f}"))
            if f"spearman_{name}_vs_log_share" in result:
                said.append(f"Spearman({name}, log share) = {result[f'spearman_{name}_vs_log_share']}")
    print(f"{len(table)} languages, {result['tokens']} tokens in {result['seconds']:.1f} s; " + "; ".join(said))
    if out is not None:
        atomic_write_json(out, result)
        y = "retrieval" if args.metric == "retrieval" else "score"
        atomic_write_text(out.with_suffix(".html"), ranking_html(result, y))
        print(f"wrote {out} and {out.with_suffix('.html')}")
    return 0


COMMANDS = {"rank-languages": cmd_rank_languages}
