"""A zoo: every norm (or the listed ones) trained with the same seed, data and budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from . import io
from .batches import load_token_data
from .errors import WorkbenchError
from .norms import get_scheme, scheme_names
from .presets import get_preset
from .train import train

ZOO_FILE = "zoo.json"
FIGURE_FILE = "loss_curves.html"


def parse_norms(norms: str | list[str] | None) -> list[str]:
    if norms is None:
        return [n for n in scheme_names() if get_scheme(n).in_default_zoo]
    names = [n.strip() for n in norms.split(",")] if isinstance(norms, str) else list(norms)
    names = [n for n in names if n]
    if not names:
        raise WorkbenchError("--norms is empty; give a comma-separated list such as pre-ln,post-ln")
    for n in names:
        get_scheme(n)  # raises a clear error for unknown names
    return list(dict.fromkeys(names))


def parse_seeds(seeds: str | list[int] | None) -> list[int] | None:
    """``"0,1,2"`` → [0, 1, 2]; None stays None (one seed, the single-seed layout)."""
    if seeds is None:
        return None
    items = [s.strip() for s in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    items = [s for s in items if s != ""]
    if not items:
        raise WorkbenchError("--seeds is empty; give a comma-separated list of integers such as 0,1,2")
    try:
        out = [int(s) for s in items]
    except (TypeError, ValueError):
        raise WorkbenchError(f"--seeds must be comma-separated integers such as 0,1,2, got {seeds!r}") from None
    if any(s < 0 for s in out):
        raise WorkbenchError(f"--seeds must be non-negative, got {seeds!r}")
    dupes = sorted({s for s in out if out.count(s) > 1})
    if dupes:
        raise WorkbenchError(f"--seeds lists seed {dupes[0]} more than once; give each seed once")
    return out


def seed_dir(seed: int) -> str:
    return f"seed{seed}"


class Run(NamedTuple):
    norm: str  # the group whose seeds make one interval
    seed: int  # what pairs two norms' runs: same initialization seed, same batches in the same order
    path: Path


def runs(out: str | Path) -> dict[str, Run]:
    """Every finished run of a zoo, labelled by its path under ``out``: ``<norm>`` (one seed, read from
    its summary) or ``<norm>/seed<k>`` (several), in registry order of the norms, then by seed."""
    out = Path(out)
    if not out.is_dir():
        return {}
    order = {n: i for i, n in enumerate(scheme_names())}
    found: dict[str, Run] = {}
    for d in sorted(out.iterdir(), key=lambda d: (order.get(d.name, len(order)), d.name)):
        if (d / io.SUMMARY_FILE).is_file():
            found[d.name] = Run(d.name, int(io.read_json(d / io.SUMMARY_FILE, "run summary").get("seed") or 0), d)
        elif d.is_dir():
            seeded = sorted((int(s.name[4:]), s) for s in d.iterdir()
                            if s.name.startswith("seed") and s.name[4:].isdigit() and (s / io.SUMMARY_FILE).is_file())
            found.update({f"{d.name}/{s.name}": Run(d.name, k, s) for k, s in seeded})
    return found


def run_dirs(out: str | Path) -> dict[str, Path]:
    """label → run directory (:func:`runs`)."""
    return {label: r.path for label, r in runs(out).items()}


def run_groups(out: str | Path) -> dict[str, str]:
    """label → norm (the group whose seeds make one interval)."""
    return {label: r.norm for label, r in runs(out).items()}


def run_seeds(out: str | Path) -> dict[str, int]:
    """label → the seed the run was trained with (what pairs two norms' runs)."""
    return {label: r.seed for label, r in runs(out).items()}


def _check_layout(out: Path, names: list[str], seeds: list[int] | None) -> None:
    for name in names:
        member = out / name
        single = (member / io.CONFIG_FILE).exists()
        if seeds is not None and single:
            raise WorkbenchError(f"{member} holds a single-seed run; give --seeds a new --out directory "
                                 "(or train this zoo on with --seed)")
        if seeds is None and member.is_dir() and any(member.glob("seed*/" + io.CONFIG_FILE)):
            raise WorkbenchError(f"{member} holds per-seed runs; continue this zoo with --seeds")


def train_zoo(
    out: str | Path,
    preset: str = "tiny",
    norms: str | list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    corpus: str = "english",
    progress: bool = True,
    log=print,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    seeds: str | list[int] | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the zoo into ``out/<norm>/`` (or ``out/<norm>/seed<k>/`` for each of ``seeds``); finished
    members are kept, unfinished ones resumed (a legacy pickled checkpoint only with ``trust_pickle``, as
    in :func:`workbench.train`). ``dtype``: float32, bfloat16 or auto (:mod:`workbench.precision`).
    Returns :func:`collect` of the members; with several seeds ``zoo.json`` also holds the intervals and
    the paired differences between norms."""
    from .precision import check_dtype, why
    from .runtime import resolve_device

    names = parse_norms(norms)
    seed_list = parse_seeds(seeds)
    check_dtype(dtype)
    p = get_preset(preset)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a directory; choose a new directory")
    _check_layout(out, names, seed_list)
    log(f"precision: {why(dtype, resolve_device(device))}")
    data = load_token_data(corpus, {**p.model, **(model_overrides or {})}["d_vocab"])
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, s, out / n / seed_dir(s)) for n in names for s in seed_list] if seed_list else \
        [(n, seed, out / n) for n in names]
    for i, (name, s, run) in enumerate(jobs, 1):
        label = str(run.relative_to(out))
        if (run / io.SUMMARY_FILE).exists():
            log(f"[{i}/{len(jobs)}] {label}: already trained, kept")
            continue
        log(f"[{i}/{len(jobs)}] training {label}")
        summary = train(name, run, preset=preset, steps=steps, seed=s, corpus=corpus, progress=progress, data=data,
                        model_overrides=model_overrides, train_overrides=train_overrides, trust_pickle=trust_pickle,
                        dtype=dtype, device=device)
        if summary["diverged"]:
            log(f"    {label} diverged at step {summary['diverged_at_step']} ({summary['divergence']})")
    results = collect(out, names)
    record: dict[str, Any] = results
    if seed_list:
        from .analysis.intervals import paired_table

        record = {"seeds": seed_list, "members": results,
                  "paired": paired_table(per_seed_values(results), ("final_val_loss",)).to_dict("records")}
    io.atomic_write_json(out / ZOO_FILE, record)
    write_loss_figure(out, names)
    return results


SUMMARY_FIELDS = ("final_val_loss", "diverged", "diverged_at_step", "steps", "tokens", "seconds", "unigram_val_loss",
                  "n_params", "dtype")


def collect(out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{norm: fields}`` of each listed member. A member trained with several seeds gets the seeds'
    mean for the numbers, ``diverged`` if any seed diverged, ``seeds: {k: fields}`` and the 95 %
    interval of its validation loss (``final_val_loss_lo/hi``, None for one seed)."""
    from .analysis.intervals import mean_interval

    found = runs(out)
    results = {}
    for name in names:
        if name in found:  # one seed
            results[name] = _fields(found[name].path)
            continue
        per = {r.seed: _fields(r.path) for r in found.values() if r.norm == name}
        if not per:
            io.read_json(out / name / io.SUMMARY_FILE, "run summary")  # the usual one-line error
        first = next(iter(per.values()))
        ok = [r for r in per.values() if not r["diverged"]]
        loss = mean_interval([r["final_val_loss"] for r in ok]) if len(ok) == len(per) else {"mean": None}
        results[name] = {
            **first,
            "final_val_loss": loss["mean"], "final_val_loss_lo": loss.get("lo"), "final_val_loss_hi": loss.get("hi"),
            "diverged": len(ok) < len(per),
            "diverged_at_step": next((r["diverged_at_step"] for r in per.values() if r["diverged"]), None),
            "seconds": sum(r["seconds"] for r in per.values()) / len(per),
            "seeds": per,
        }
    return results


def _fields(run: Path) -> dict[str, Any]:
    s = io.read_json(run / io.SUMMARY_FILE, "run summary")
    return {k: s.get(k, "float32" if k == "dtype" else None) for k in SUMMARY_FIELDS}


def per_seed_values(results: dict[str, dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{norm: {seed: fields}}`` from :func:`collect`'s records (one-seed members: their own seed 0…)."""
    return {n: r.get("seeds") or {0: r} for n, r in results.items()}


def collect_existing(out: str | Path) -> dict[str, dict[str, Any]]:
    """The summaries of every finished member under ``out`` (no error for a missing or partial zoo)."""
    names = list(dict.fromkeys(r.norm for r in runs(out).values()))
    return collect(Path(out), names) if names else {}


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / io.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_table(out: str | Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Tidy rows (norm, seed, step, split, loss) of every zoo member's loss curves (every seed's)."""
    rows = []
    for norm, seed, run in runs(out).values():
        if names is not None and norm not in names:
            continue
        for m in read_metrics(run):
            rows.append({"norm": norm, "seed": seed, "step": m["step"], "split": "train", "loss": m["train_loss"]})
            if "val_loss" in m:
                rows.append({"norm": norm, "seed": seed, "step": m["step"], "split": "validation", "loss": m["val_loss"]})
    return rows


def loss_bands(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (norm, split, step): the seeds' mean loss and its 95 % t-interval (lo/hi None for one seed)."""
    from .analysis.intervals import mean_interval

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["norm"], r["split"], r["step"]), []).append(r["loss"])
    return [{"norm": n, "split": sp, "step": st, **mean_interval(v)} for (n, sp, st), v in groups.items()]


def loss_figure(rows: list[dict[str, Any]], splits: tuple[str, ...] = ("validation", "train")):
    """Loss curves per norm (the seeds' mean, a shaded 95 % band on validation where there are seeds), one
    colour and one legend entry per norm; ``splits``: which curves (validation solid, training dotted)."""
    import plotly.graph_objects as go

    from .analysis.figures import add_band, color, legend_height

    fig = go.Figure()
    bands = loss_bands(rows)
    norms = list(dict.fromkeys(r["norm"] for r in bands))
    for i, norm in enumerate(norms):
        shown = False
        for split, dash in (("validation", "solid"), ("train", "dot")):
            pts = sorted((b for b in bands if b["norm"] == norm and b["split"] == split), key=lambda b: b["step"])
            if split not in splits or not pts:
                continue
            if split == "validation" and all(b["lo"] is not None for b in pts):
                add_band(fig, [b["step"] for b in pts], [b["lo"] for b in pts], [b["hi"] for b in pts], color(i), norm)
            n = max(b["n"] for b in pts)
            fig.add_scatter(x=[b["step"] for b in pts], y=[b["mean"] for b in pts], mode="lines",
                            name=norm + (f" (mean of {n} seeds)" if n > 1 else ""), legendgroup=norm,
                            showlegend=not shown, hovertemplate=f"{norm} ({split})<br>step %{{x}}: %{{y:.3f}} nats"
                            "<extra></extra>", line={"dash": dash, "color": color(i)})
            shown = True
    which = " and ".join({"validation": "validation (solid)", "train": "training (dotted)"}[s] for s in splits)
    fig.update_layout(title=f"Loss curves by normalization: {which}", xaxis_title="training step",
                      yaxis_title="cross-entropy (nats)", template="plotly_white", height=legend_height(len(norms)),
                      legend_title_text="normalization")
    return fig


def write_loss_figure(out: Path, names: list[str]) -> Path:
    fig = loss_figure(loss_table(out, names))
    path = out / FIGURE_FILE
    io.atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path


def format_table(results: dict[str, dict[str, Any]]) -> str:
    seeds = any(r.get("seeds") for r in results.values())
    lines = [f"{'norm':<10} {'val loss':>9} {'95% interval':>17} {'diverged':>9} {'steps':>6} {'seconds':>8}" if seeds
             else f"{'norm':<10} {'val loss':>9} {'diverged':>9} {'steps':>6} {'seconds':>8}"]
    for name, r in results.items():
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        div = f"at {r['diverged_at_step']}" if r["diverged"] else "no"
        ci = f"[{r['final_val_loss_lo']:.4f}, {r['final_val_loss_hi']:.4f}]" if r.get("final_val_loss_lo") is not None \
            else "-"
        lines.append(f"{name:<10} {loss:>9} {ci:>17} {div:>9} {r['steps']:>6} {r['seconds']:>8.1f}" if seeds
                     else f"{name:<10} {loss:>9} {div:>9} {r['steps']:>6} {r['seconds']:>8.1f}")
    uni = next(iter(results.values()), {}).get("unigram_val_loss")
    if uni is not None:
        lines.append(f"(unigram baseline on validation: {uni:.4f} nats)")
    if seeds:
        lines.append("(seeds: mean and Student-t 95% interval; seconds per seed; paired differences in zoo.json)")
    return "\n".join(lines)
