"""Plotly figures built from the analyses' tidy tables (the tables are the source of truth)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# Fifteen colours told apart at a glance, from Kelly's colours of maximum contrast (1965) plus a teal:
# a zoo holds up to fifteen norms, and Plotly's ten-colour default repeats itself past the tenth.
PALETTE = ("#0067A5", "#F38400", "#008856", "#BE0032", "#875692", "#222222", "#A1CAF1", "#C2B280", "#E68FAC",
           "#848482", "#F3C300", "#882D17", "#8DB600", "#00A3A3", "#604E97")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def legend_height(entries: int, base: int = 450) -> int:
    """A figure tall enough for a legend of ``entries`` lines (Plotly scrolls, and so hides, the rest)."""
    return max(base, 140 + 24 * entries)


def add_band(fig: go.Figure, x, lo, hi, color: str, group: str) -> None:
    """A shaded 95 % interval between ``lo`` and ``hi`` along ``x`` (no legend entry; it follows ``group``)."""
    x = list(x)
    fig.add_scatter(x=x + x[::-1], y=list(hi) + list(lo)[::-1], fill="toself", line={"width": 0}, fillcolor=color,
                    opacity=0.2, hoverinfo="skip", showlegend=False, legendgroup=group, name=f"{group} 95% interval")


def dla_bars(table: pd.DataFrame, top: int = 25, title: str = "Direct logit attribution") -> go.Figure:
    """DLA next to the direct effect, largest |DLA| first."""
    t = table.reindex(table.dla.abs().sort_values(ascending=False).index).head(top)
    fig = go.Figure([go.Bar(name="DLA (frozen norm)", x=t.name, y=t.dla),
                     go.Bar(name="direct effect (norm recomputed)", x=t.name, y=t.direct_effect)])
    fig.update_layout(barmode="group", title=title, yaxis_title="logit contribution", template="plotly_white")
    return fig


def head_grid(table: pd.DataFrame, value: str = "dla", title: str | None = None) -> go.Figure:
    """Layer × head heat map of one column of a DLA or patching table."""
    heads = table[table.head.notna()] if "kind" not in table else table[table.kind == "head"]
    grid = heads.pivot_table(index="layer", columns="head", values=value)
    lim = float(np.nanmax(np.abs(grid.values))) or 1.0
    fig = go.Figure(go.Heatmap(z=grid.values, x=[f"H{int(h)}" for h in grid.columns],
                               y=[f"L{int(l)}" for l in grid.index], colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim))
    fig.update_layout(title=title or f"{value} per head", yaxis_autorange="reversed", template="plotly_white")
    return fig


def resid_patching_map(table: pd.DataFrame, str_tokens: list[str] | None = None) -> go.Figure:
    """Residual-stream activation patching, layer × position, normalized to the clean-corrupt gap."""
    r = table[table.kind == "resid"].pivot_table(index="layer", columns="pos", values="normalized")
    x = [f"{int(p)}: {str_tokens[int(p)]!r}" for p in r.columns] if str_tokens else [int(p) for p in r.columns]
    fig = go.Figure(go.Heatmap(z=r.values, x=x, y=[f"L{int(l)}" for l in r.index], colorscale="RdBu", zmid=0))
    fig.update_layout(title="Activation patching of the residual stream (1 = clean restored)",
                      yaxis_autorange="reversed", template="plotly_white")
    return fig


def attribution_vs_activation(table: pd.DataFrame) -> go.Figure:
    """Attribution-patching estimate against the true activation-patching effect, one point per unit."""
    fig = go.Figure()
    for kind, g in table.groupby("kind"):
        fig.add_scatter(x=g.activation, y=g.attribution, mode="markers", name=kind)
    lo = float(min(table.activation.min(), table.attribution.min()))
    hi = float(max(table.activation.max(), table.attribution.max()))
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "gray"})
    fig.update_layout(xaxis_title="activation patching", yaxis_title="attribution patching",
                      title="Attribution vs activation patching", template="plotly_white")
    return fig
