"""One depth metric across the models of a zoo: a tidy table and an overlaid plotly figure, from
``diagnose`` results (``workbench.studies.zoo_diagnostics`` computes and caches them, ``compare_zoo``
writes the table and figure)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ..errors import WorkbenchError
from .figures import add_band, color, legend_height
from .intervals import mean_interval, paired_table, seed_table

# metric name on the command line -> (row metric in the depth table, y-axis title)
METRICS = {
    "resid_var": ("resid_var_pos1", "residual variance (positions ≥ 1)"),
    "grad_norm": ("grad_norm_block", "gradient norm per block"),
    "angular_distance": ("angular_distance_n1", "angular distance to the next layer (last token)"),
    "ablation": ("ablation_delta_ce", "ΔCE when the block is skipped (nats)"),
}


def compare_table(results: dict[str, dict], metric: str, groups: dict[str, str] | None = None) -> pd.DataFrame:
    """Tidy rows (model, group, layer, metric, value); ``groups`` maps a model to the group its interval
    pools over (a zoo's seeds of one norm: :func:`workbench.zoo.run_groups`), default the model itself."""
    from .depth import depth_table

    if metric not in METRICS:
        raise WorkbenchError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    row_metric = METRICS[metric][0]
    frames = []
    for name, r in results.items():
        t = depth_table(r)
        frames.append(t[t.metric == row_metric].assign(model=name, group=(groups or {}).get(name, name)))
    return pd.concat(frames)[["model", "group", "layer", "metric", "value"]].reset_index(drop=True)


# Metrics drawn on a log axis: their seeds are pooled as logarithms (a geometric mean and its interval),
# which stays positive where a linear interval of a widely spread positive quantity would cross zero.
LOG_METRICS = ("resid_var",)


def band_table(table: pd.DataFrame, log: bool = False) -> pd.DataFrame:
    """Per group and layer: the members' mean value and its 95 % Student-t interval (lo/hi NaN for one);
    ``log``: the interval of log(value), exponentiated — the geometric mean and its interval."""
    import math

    rows = []
    for (group, layer), g in table.groupby(["group", "layer"], sort=False):
        if log and g.value.count() > 1:  # one member: its value as it is (exp(log v) would round it)
            r = mean_interval([math.log(v) for v in g.value if v is not None and v > 0])
            r = {**r, **{k: math.exp(r[k]) if r[k] is not None else None for k in ("mean", "lo", "hi")}}
        else:
            r = mean_interval(g.value.tolist())
        rows.append({"group": group, "layer": layer, **r})
    return pd.DataFrame(rows, columns=["group", "layer", "n", "mean", "sd", "lo", "hi"])


def compare_figure(table: pd.DataFrame, metric: str) -> go.Figure:
    """One line per group: the value itself, or for a group of several seeds their mean (geometric on a log
    axis) with a shaded 95 % interval."""
    fig = go.Figure()
    if "group" not in table:
        table = table.assign(group=table.model)
    log = metric in LOG_METRICS
    for i, (name, g) in enumerate(band_table(table, log).groupby("group", sort=False)):
        n = int(g.n.max())
        if n > 1:
            add_band(fig, g.layer, g.lo, g.hi, color(i), name)
        what = f" (geometric mean of {n})" if log else f" (mean of {n})"
        fig.add_scatter(x=g.layer, y=g["mean"], mode="lines+markers", name=name + (what if n > 1 else ""),
                        legendgroup=name, line={"color": color(i)})
    fig.update_layout(title=METRICS[metric][1], xaxis_title="layer", yaxis_title=METRICS[metric][1],
                      template="plotly_white", yaxis_type="log" if log else "linear",
                      height=legend_height(table.group.nunique()))
    return fig


def depth_summary(results: dict[str, dict]) -> pd.DataFrame:
    """One row per model: residual-variance growth and the shape of the gradient-norm profile.

    ``var_growth``: variance of h_L over h_1 (positions ≥ 1; h_0 is the bare embedding, whose scale is
    set by initialization, not by depth). ``grad_cv``: coefficient of variation of the per-block
    gradient norm across blocks. ``grad_deep_shallow``: mean gradient norm of the deepest third of
    the blocks over that of the shallowest third (< 1: deep blocks get smaller gradients).
    """
    import numpy as np

    rows = []
    for name, r in results.items():
        layers = r["residual"]["layers"]
        var = [rec["resid_var_pos1"] for rec in layers]
        g = np.array([rec["block"] for rec in r["grad_norm"]])
        third = max(1, len(g) // 3)
        rows.append({
            "model": name, "var_growth": var[-1] / var[1] if len(var) > 2 else var[-1] / var[0],
            "var_growth_from_embedding": var[-1] / var[0],
            "var_growth_median_token": layers[-1]["resid_var_median_token"] / layers[1]["resid_var_median_token"],
            "grad_cv": float(g.std() / g.mean()), "grad_deep_shallow": float(g[-third:].mean() / g[:third].mean()),
            "max_ablation_delta_ce": max(r["ablation_delta_ce"]),
            "ablation_delta_ce_last_third": float(np.mean(r["ablation_delta_ce"][-third:])),
            "val_ce": r["val_ce"],
        })
    return pd.DataFrame(rows)


SUMMARY_METRICS = ("val_ce", "var_growth", "grad_cv", "grad_deep_shallow", "ablation_delta_ce_last_third")


def depth_intervals(summary: pd.DataFrame, groups: dict[str, str], seeds: dict[str, int] | None = None,
                    metrics=SUMMARY_METRICS) -> pd.DataFrame:
    """:func:`depth_summary`'s rows pooled per group (a norm's seeds: :func:`workbench.zoo.run_groups`):
    (model = group, metric, n, mean, sd, lo, hi, values)."""
    return seed_table(_per_seed(summary, groups, seeds), metrics)


def depth_paired(summary: pd.DataFrame, groups: dict[str, str], seeds: dict[str, int] | None = None,
                 metrics=SUMMARY_METRICS, pairs=None) -> pd.DataFrame:
    """Paired differences between groups, run against run of the same seed (same batches, same order;
    :func:`workbench.zoo.run_seeds`)."""
    return paired_table(_per_seed(summary, groups, seeds), metrics, pairs)


def _per_seed(summary: pd.DataFrame, groups: dict[str, str], seeds: dict[str, int] | None) -> dict[str, dict[int, dict]]:
    """{group: {seed: row}}; without ``seeds`` a run's seed is its position within its group."""
    out: dict[str, dict[int, dict]] = {}
    for row in summary.to_dict("records"):
        group = groups.get(row["model"], row["model"])
        seed = (seeds or {}).get(row["model"], len(out.get(group, {})))
        out.setdefault(group, {})[seed] = row
    return out


SUMMARY_TITLES = {
    "final_val_loss": "validation loss (nats)",
    "val_ce": "cross-entropy on the diagnosed tokens (nats)",
    "var_growth": "residual variance growth h_L / h_1",
    "grad_cv": "gradient-norm CV across blocks",
    "grad_deep_shallow": "gradient norm, deepest / shallowest third",
    "ablation_delta_ce_last_third": "ΔCE when a block of the last third is skipped (nats)",
}


def interval_bars(intervals: pd.DataFrame, metric: str) -> go.Figure:
    """One bar per group: the mean of ``metric`` with its 95 % interval as an error bar (and the seeds'
    own values as points), from :func:`depth_intervals`' table."""
    t = intervals[intervals.metric == metric]
    has = t.lo.notna()
    fig = go.Figure(go.Bar(
        x=t.model, y=t["mean"], name="mean",
        error_y=dict(type="data", symmetric=False, array=(t.hi - t["mean"]).where(has, 0).tolist(),
                     arrayminus=(t["mean"] - t.lo).where(has, 0).tolist(), visible=bool(has.any()))))
    xs = [m for m, vs in zip(t.model, t["values"]) for _ in vs]
    ys = [v for vs in t["values"] for v in vs]
    fig.add_scatter(x=xs, y=ys, mode="markers", name="seeds", marker={"color": "black", "size": 6})
    title = SUMMARY_TITLES.get(metric, metric)
    fig.update_layout(title=f"{title}: mean and 95% interval over seeds", yaxis_title=title, template="plotly_white")
    return fig
