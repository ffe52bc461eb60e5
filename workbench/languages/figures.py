"""Figures of the Language Ranker, built from its tidy tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go


def layer_heatmap(layers: pd.DataFrame, top: int | None = None, title: str = "Cosine similarity to English",
                  value: str = "cosine") -> go.Figure:
    """Languages (best score at the top) × layers; ``value``: cosine or retrieval."""
    df = layers if top is None else layers[layers["rank"] <= top]
    grid = df.pivot_table(index=["rank", "code", "name"], columns="layer", values=value).sort_index()
    labels = [f"{code} — {name}" for _, code, name in grid.index]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=list(grid.columns), y=labels, colorscale="Viridis",
                               colorbar={"title": "cos" if value == "cosine" else value}))
    fig.update_layout(title=title, xaxis_title="layer (residual stream after block)",
                      yaxis={"autorange": "reversed", "tickfont": {"size": 9}},
                      height=max(350, 14 * len(labels) + 120))
    return fig


def score_vs(ranking: pd.DataFrame, x: str = "bits_per_english_byte", log_x: bool = False,
             title: str | None = None, y: str = "score") -> go.Figure:
    """A Ranker score (``y``: score = cosine, or retrieval) against an independent measure (bits per
    English byte, or training share)."""
    df = ranking.dropna(subset=[x, y])
    color = df["script"] if "script" in df and df["script"].astype(bool).any() else None
    fig = go.Figure()
    groups = [("", df)] if color is None else list(df.groupby("script"))
    for name, g in groups:
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=str(name) or "languages",
                                 text=[f"{c} — {n}" for c, n in zip(g["code"], g["name"])],
                                 hovertemplate="%{text}<br>" + x + " %{x:.3g}<br>" + y + " %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Language Ranker {y} vs {x.replace('_', ' ')}", xaxis_title=x.replace("_", " "),
                      yaxis_title=y, xaxis_type="log" if log_x else "linear")
    if len(df) >= 2 and not log_x:
        k, b = np.polyfit(df[x].astype(float), df[y].astype(float), 1)
        xs = np.linspace(df[x].min(), df[x].max(), 2)
        fig.add_trace(go.Scatter(x=xs, y=k * xs + b, mode="lines", name="least squares", line={"dash": "dot"}))
    return fig


def signed(v: float) -> str:
    """Two decimals with a true minus sign, and no "−0.00" for a bound that rounds to zero."""
    return f"{v:.2f}".replace("-", "−") if round(v, 2) != 0 else "0.00"


def signed_or_na(v: float | None) -> str:
    return "n/a" if v is None else signed(v)


def spearman_text(result: dict, y: str, x: str) -> str:
    """``Spearman ρ = −0.55 [−0.68, −0.40]`` from a rank-languages result's ``spearman_{y}_vs_{x}`` and its
    ``_ci95``; "n/a" where the result has none (fewer languages than the statistic needs, or an older result)."""
    rho, ci = result.get(f"spearman_{y}_vs_{x}"), result.get(f"spearman_{y}_vs_{x}_ci95")
    return ("Spearman ρ = " + signed_or_na(rho)
            + (" [n/a]" if ci is None else f" [{signed(ci[0])}, {signed(ci[1])}]"))


def ranking_html(result: dict, y: str = "score") -> str:
    """The page ``rank-languages --out FILE.json`` writes beside the JSON: heat map and score scatter,
    self-contained (plotly.js inlined once) so that it opens offline."""
    from .ranker import layer_table, ranking_table

    heat = layer_heatmap(layer_table(result), title=f"{result['model']}: "
                         + ("retrieval alignment" if y == "retrieval" else "cosine similarity") + " to English",
                         value="retrieval" if y == "retrieval" else "cosine")
    scatter = score_vs(ranking_table(result), y=y, title=f"{y} vs bits per English byte: "
                       f"{spearman_text(result, y, 'bits_per_english_byte')}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Language Ranker</title></head><body>"
            + heat.to_html(full_html=False, include_plotlyjs=True)
            + scatter.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")
