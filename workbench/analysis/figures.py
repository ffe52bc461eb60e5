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
    """A figure tall enough for a legend of ``entries`` lines (Plotly scrolls, and so hides, the rest): the
    legend gets the plot area (the height less the default margins, 180 px) and needs about 30 px an entry
    as Streamlit renders it (measured in the browser screenshots)."""
    return max(base, 240 + 30 * entries)


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


def _token_labels(table: pd.DataFrame) -> list[str]:
    """``pos: 'token'`` for each position of a per-token table, in order (the position keeps repeats apart)."""
    first = table.dropna(subset=["pos"]).drop_duplicates("pos").sort_values("pos")
    return [f"{int(p)}: {t!r}" for p, t in zip(first.pos, first.token)]


def norm_scale_map(table: pd.DataFrame, kind: str) -> go.Figure:
    """Sites of one kind × tokens (a ``norm_scales`` table): each scale relative to its site's median over the
    prompt, on a log₂ colour scale centred on 1 so that a token divided by 8× or by ⅛ of the usual stands out alike."""
    t = table[(table.kind == kind) & table.skipped.isna()]
    row = np.where(t.layer.isna(), "final", "L" + t.layer.astype(str))
    row = np.where(t["head"].isna(), row, row + " H" + t["head"].astype(str))
    t = t.assign(row=row)
    order = list(dict.fromkeys(t.row))  # the model's own order: by layer, then head
    relative = t.pivot(index="row", columns="pos", values="relative").reindex(order)
    scale = t.pivot(index="row", columns="pos", values="scale").reindex(order)
    z = np.log2(relative.to_numpy(dtype=float))
    lim = max(1.0, float(np.ceil(np.nanmax(np.abs(z))))) if np.isfinite(z).any() else 1.0
    ticks = np.arange(-lim, lim + 1)
    fig = go.Figure(go.Heatmap(
        z=z, x=_token_labels(t), y=order, colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim,
        customdata=np.dstack([scale.to_numpy(dtype=float), relative.to_numpy(dtype=float)]),
        hovertemplate="%{y} · %{x}<br>scale %{customdata[0]:.4g}<br>× median %{customdata[1]:.3g}<extra></extra>",
        colorbar={"title": "× median", "tickvals": ticks, "ticktext": [f"{2.0 ** k:g}" for k in ticks]}))
    fig.update_layout(title=f"{kind}: scale relative to the site's median over the prompt", template="plotly_white",
                      yaxis_autorange="reversed", height=max(260, 120 + 22 * len(order)))
    return fig


def logit_lens_map(table: pd.DataFrame, method: str, value: str = "top_prob") -> go.Figure:
    """Layer × token map of one lens method (a ``logit_lens`` table): ``value`` as colour, the top token
    written in each cell. The colour range spans every method of the table, so side-by-side maps compare."""
    t = table[table.method == method]
    grid = t.pivot(index="layer", columns="pos", values=value)
    # repr: a leading space, a newline or an HTML-like special token (<|endoftext|>) stays visible as written.
    text = t.pivot(index="layer", columns="pos", values="top_token").reindex(index=grid.index).map(repr)
    lo, hi = float(np.nanmin(table[value])), float(np.nanmax(table[value]))
    y = ["embed" if int(l) == 0 else f"block {int(l) - 1}" for l in grid.index]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=_token_labels(t), y=y, text=text.to_numpy(),
                               texttemplate="%{text}", colorscale="Viridis", zmin=lo, zmax=hi,
                               hovertemplate="%{y} · %{x}<br>top %{text}<br>%{z:.3g}<extra></extra>"))
    fig.update_layout(title=f"Logit lens, ln_final {method}: {value.replace('_', ' ')}", template="plotly_white",
                      yaxis_title="residual after", height=max(300, 120 + 26 * len(y)))
    return fig
