"""A zoo: every norm (or the listed ones) trained with the same seed, data and budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import io
from .data import load_token_data
from .errors import WorkbenchError
from .norms import get_scheme, scheme_names
from .presets import get_preset
from .train import train

ZOO_FILE = "zoo.json"
FIGURE_FILE = "loss_curves.html"


def parse_norms(norms: str | list[str] | None) -> list[str]:
    if norms is None:
        return scheme_names()
    names = [n.strip() for n in norms.split(",")] if isinstance(norms, str) else list(norms)
    names = [n for n in names if n]
    if not names:
        raise WorkbenchError("--norms is empty; give a comma-separated list such as pre-ln,post-ln")
    for n in names:
        get_scheme(n)  # raises a clear error for unknown names
    return list(dict.fromkeys(names))


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
) -> dict[str, dict[str, Any]]:
    """Train the zoo into ``out/<norm>/``; finished members are kept, unfinished ones resumed
    (a legacy pickled checkpoint only with ``trust_pickle``, as in :func:`workbench.train`)."""
    names = parse_norms(norms)
    p = get_preset(preset)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a directory; choose a new directory")
    data = load_token_data(corpus, {**p.model, **(model_overrides or {})}["d_vocab"])
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        run = out / name
        if (run / io.SUMMARY_FILE).exists():
            log(f"[{i}/{len(names)}] {name}: already trained, kept")
            continue
        log(f"[{i}/{len(names)}] training {name}")
        summary = train(name, run, preset=preset, steps=steps, seed=seed, corpus=corpus, progress=progress, data=data,
                        model_overrides=model_overrides, train_overrides=train_overrides, trust_pickle=trust_pickle)
        if summary["diverged"]:
            log(f"    {name} diverged at step {summary['diverged_at_step']} ({summary['divergence']})")
    results = collect(out, names)
    io.atomic_write_json(out / ZOO_FILE, results)
    write_loss_figure(out, names)
    return results


def collect(out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        s = io.read_json(out / name / io.SUMMARY_FILE, "run summary")
        results[name] = {k: s.get(k) for k in ("final_val_loss", "diverged", "diverged_at_step", "steps", "tokens",
                                                "seconds", "unigram_val_loss", "n_params")}
    return results


def collect_existing(out: str | Path) -> dict[str, dict[str, Any]]:
    """The summaries of every finished run under ``out`` (no error for a missing or partial zoo)."""
    out = Path(out)
    if not out.is_dir():
        return {}
    names = [d.name for d in sorted(out.iterdir()) if (d / io.SUMMARY_FILE).is_file()]
    order = {n: i for i, n in enumerate(scheme_names())}
    return collect(out, sorted(names, key=lambda n: order.get(n, len(order))))


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / io.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_table(out: str | Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Tidy rows (norm, step, split, loss) of every zoo member's loss curves."""
    out = Path(out)
    names = names or [d.name for d in sorted(out.iterdir()) if (d / io.METRICS_FILE).exists()]
    rows = []
    for name in names:
        for m in read_metrics(out / name):
            rows.append({"norm": name, "step": m["step"], "split": "train", "loss": m["train_loss"]})
            if "val_loss" in m:
                rows.append({"norm": name, "step": m["step"], "split": "validation", "loss": m["val_loss"]})
    return rows


def loss_figure(rows: list[dict[str, Any]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for norm in dict.fromkeys(r["norm"] for r in rows):
        for split, dash in (("train", "dot"), ("validation", "solid")):
            pts = [r for r in rows if r["norm"] == norm and r["split"] == split]
            if pts:
                fig.add_scatter(x=[r["step"] for r in pts], y=[r["loss"] for r in pts], mode="lines",
                                name=f"{norm} ({split})", legendgroup=norm, line={"dash": dash})
    fig.update_layout(title="Loss curves by normalization", xaxis_title="step", yaxis_title="cross-entropy (nats)",
                      template="plotly_white")
    return fig


def write_loss_figure(out: Path, names: list[str]) -> Path:
    fig = loss_figure(loss_table(out, names))
    path = out / FIGURE_FILE
    io.atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'norm':<10} {'val loss':>9} {'diverged':>9} {'steps':>6} {'seconds':>8}"]
    for name, r in results.items():
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        div = f"at {r['diverged_at_step']}" if r["diverged"] else "no"
        lines.append(f"{name:<10} {loss:>9} {div:>9} {r['steps']:>6} {r['seconds']:>8.1f}")
    uni = next(iter(results.values()), {}).get("unigram_val_loss")
    if uni is not None:
        lines.append(f"(unigram baseline on validation: {uni:.4f} nats)")
    return "\n".join(lines)
