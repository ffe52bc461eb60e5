"""Studies that load models and write files, over the pure table functions of ``workbench.analysis``:
the diagnostics of a zoo (cached per run as ``diagnose.json``), the comparison of one depth metric across
a zoo (``workbench compare``: CSV, HTML and, where kaleido works, PNG) and layer-ablation studies from
TOML (``workbench study``: ``study.csv`` and one figure per ablation kind)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .analysis.compare import LOG_METRICS, METRICS, band_table, compare_figure, compare_table
from .analysis.depth import SCHEMA_VERSION, diagnose
from .analysis.study import Study, load_study, study_figure, study_table
from .errors import WorkbenchError
from .io import atomic_write_json, atomic_write_text
from .loader import load
from .zoo import run_dirs, run_groups

DIAGNOSE_FILE = "diagnose.json"


def zoo_diagnostics(zoo: str | Path, tokens: int = 16384) -> dict[str, dict]:
    """``diagnose`` of every finished run in ``zoo`` (cached as ``<run>/diagnose.json``), keyed by the run's
    label: ``<norm>``, or ``<norm>/seed<k>`` in a zoo trained with several seeds."""
    zoo = Path(zoo)
    runs = run_dirs(zoo)
    if not runs:
        raise WorkbenchError(f"no trained models in {zoo}; train them with `workbench zoo --out {zoo}`")
    results = {}
    for label, run in runs.items():
        cached = run / DIAGNOSE_FILE
        if cached.exists():
            r = json.loads(cached.read_text())
            if r.get("schema_version") == SCHEMA_VERSION and r["data"]["n_tokens"] >= tokens:
                results[label] = r
                continue
        model = load(run)
        results[label] = diagnose(model, tokens=tokens, model_id=str(run))
        atomic_write_json(cached, results[label])
    return results


def compare_zoo(zoo: str | Path, metric: str, tokens: int = 16384, out: str | Path | None = None):
    """``metric`` across every run of ``zoo``: (the tidy table, the paths written under ``out``, default
    the zoo)."""
    if metric not in METRICS:
        raise WorkbenchError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    out = Path(out or zoo)
    if not out.is_dir():
        raise WorkbenchError(f"--out {out} is not a directory; create it first")
    table = compare_table(zoo_diagnostics(zoo, tokens), metric, run_groups(zoo))
    fig = compare_figure(table, metric)
    paths = [out / f"compare_{metric}.csv", out / f"compare_{metric}.html"]
    atomic_write_text(paths[0], table.to_csv(index=False))
    atomic_write_text(paths[1], fig.to_html(include_plotlyjs=True))
    if table.groupby("group").model.nunique().max() > 1:  # seeds: the band each curve shows, as numbers
        paths.append(out / f"compare_{metric}_bands.csv")
        atomic_write_text(paths[-1], band_table(table, metric in LOG_METRICS).to_csv(index=False))
    try:  # a PNG too where kaleido (and its browser) is available
        png = out / f"compare_{metric}.png"
        fig.write_image(str(png))
        paths.append(png)
    except Exception:  # noqa: BLE001 — optional output; the HTML and CSV are the result
        pass
    return table, paths


def run_study(study: Study | str | Path, out: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every (model, ablation, unit) of a study (or study file); returns the tidy table and writes it
    (+ one figure per ablation kind) to ``out``."""
    study = study if isinstance(study, Study) else load_study(study)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise WorkbenchError(f"--out {out_dir} exists and is not a directory")
    table = study_table(study, {spec: load(spec) for spec in study.models}, progress=progress)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "study.csv", table.to_csv(index=False))
        for kind in dict.fromkeys(table.kind):
            atomic_write_text(out_dir / f"study_{kind}.html", study_figure(table, kind).to_html(include_plotlyjs=True))
    return table
