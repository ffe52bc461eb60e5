"""Tables and figures of a finished ``remove-ln`` run, read from its directory."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from ..errors import WorkbenchError


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
