"""Tables and figures of a finished ``remove-ln`` run, read from its directory."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..errors import WorkbenchError
from .schedule import COOL_DOWN, PRECONDITION


def read_removal(run: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(summary, schedule table, per-step metrics table) of a remove-ln output directory."""
    d = Path(run)
    if not (d / "summary.json").is_file():
        raise WorkbenchError(f"{d} has no summary.json; it is not a finished `workbench remove-ln` directory")
    summary = json.loads((d / "summary.json").read_text())
    schedule = pd.DataFrame(summary.get("schedule", []))
    metrics_file = d / "metrics.jsonl"
    metrics = pd.DataFrame([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
                           if metrics_file.is_file() else [])
    return summary, schedule, metrics


def ce_table(summary: dict) -> pd.DataFrame:
    """Validation cross-entropy of the original, the control (norms kept) and the LN-free model."""
    rows = [("original", summary.get("ce_original")), ("control (fine-tuned, norms kept)", summary.get("ce_control")),
            ("LN-free", summary.get("ce_ln_free"))]
    df = pd.DataFrame(rows, columns=["model", "ce"])
    df["minus_control"] = df["ce"] - summary["ce_control"] if summary.get("ce_control") is not None else None
    return df


RUNAWAY_LOSS = 10.0  # a batch loss above this held a runaway window (the original's is ~4 on text)


def stretch_table(metrics: pd.DataFrame, every: int = 32) -> pd.DataFrame:
    """The trend of a run, one row per ``every`` consecutive steps of a phase (the preconditioning, the
    removal of the norms, the cool-down after the last one): each stretch's median training loss, the
    control's on the same batches and their gap, the median KL to the teacher when distilling, and how many
    steps held a runaway window (a loss above ``RUNAWAY_LOSS`` or not finite)."""
    if every < 1:
        raise WorkbenchError(f"a stretch needs at least 1 step, got {every}")
    if metrics.empty:
        return pd.DataFrame()
    m = metrics.sort_values("step").reset_index(drop=True)
    m["phase"] = m.norm.map({PRECONDITION: "precondition", COOL_DOWN: "cool-down"}).fillna("removal")
    m["stretch"] = m.groupby("phase", sort=False).cumcount() // every
    if "control_loss" in m:
        m["gap"] = m.loss - m.control_loss
    m["runaway"] = ~(m.loss <= RUNAWAY_LOSS)
    cols = {c: (c, "median") for c in ("loss", "control_loss", "gap", "kl") if c in m}
    out = m.groupby(["phase", "stretch"], sort=False).agg(first_step=("step", "min"), last_step=("step", "max"),
                                                          **cols, runaway_steps=("runaway", "sum"))
    return out.reset_index()


def removal_figure(metrics: pd.DataFrame, schedule: pd.DataFrame, title: str = "Fine-tuning while norms are removed") -> go.Figure:
    """Training loss of the removal run and of its control, with a marker where each norm was frozen."""
    fig = go.Figure()
    if not metrics.empty:
        fig.add_scatter(x=metrics.step, y=metrics.loss, mode="lines", name="removal run")
        if "control_loss" in metrics:
            fig.add_scatter(x=metrics.step, y=metrics.control_loss, mode="lines", name="control (norms kept)",
                            line={"dash": "dot"})
    if not schedule.empty and not metrics.empty:
        y = metrics.loss.max()
        fig.add_scatter(x=schedule.step, y=[y] * len(schedule), mode="markers", name="norm frozen",
                        marker={"symbol": "triangle-down", "size": 9}, text=schedule.norm,
                        hovertemplate="step %{x}: %{text}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="fine-tuning step", yaxis_title="training loss (nats)",
                      template="plotly_white")
    return fig
