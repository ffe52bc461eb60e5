"""Depth: residual variance, gradient norms, angular distance and layer-ablation ΔCE, overlaid."""

import json
from pathlib import Path

import streamlit as st

from dashboard.common import diagnose_spec, load_json, manifest, missing
from workbench.analysis.compare import (METRICS, SUMMARY_METRICS, SUMMARY_TITLES, compare_figure, compare_table,
                                        depth_intervals, depth_paired, depth_summary, interval_bars)
from workbench.errors import WorkbenchError
from workbench.studies import DIAGNOSE_FILE
from workbench.zoo import run_dirs, run_groups, run_seeds

st.title("Depth diagnostics")
m = manifest() or {}
# The demo's deep (12-layer) members first: two blocks of the tiny zoo show no depth effect.
zoo_dir = Path(st.text_input("Zoo directory", value=m.get("depth_zoo") or m.get("zoo", "zoo/tiny")))
extra = st.text_input("More diagnose results (LABEL=FILE.json, comma-separated)",
                      value=",".join(f"{k}={v}" for k, v in m.get("diagnostics", {}).items()),
                      help="e.g. smollm2=results/smollm2_diagnose.json from `workbench diagnose smollm2 --out …`")

spec = st.text_input("Or diagnose any model (run directory, Hugging Face directory, smollm2 or hf:NAME)",
                     value=st.query_params.get("model", ""))  # ?model=SPEC in the address
spec_tokens = st.number_input("Tokens for that model", min_value=64, max_value=65536, value=1024, step=64)

available = {n: d / DIAGNOSE_FILE for n, d in run_dirs(zoo_dir).items() if (d / DIAGNOSE_FILE).is_file()}
groups, seeds = run_groups(zoo_dir), run_seeds(zoo_dir)  # a zoo trained with --seeds: one group per norm
for item in filter(None, (s.strip() for s in extra.split(","))):
    label, _, path = item.rpartition("=")
    if Path(path).is_file():
        available[label or Path(path).stem] = Path(path)
    else:
        st.warning(f"`{path}` not found; make it with `workbench diagnose MODEL --out {path}`")
computed = {}
if spec:
    try:
        computed[spec] = diagnose_spec(spec, int(spec_tokens))
    except WorkbenchError as e:
        st.error(str(e))
if not available and not computed:
    missing(f"No depth diagnostics for the models in `{zoo_dir}`.", f"workbench compare {zoo_dir} --metric resid_var")

metric = st.selectbox("Metric", list(METRICS), format_func=lambda k: METRICS[k][1])
chosen = st.multiselect("Models", [*available, *computed], default=[*available, *computed])
relative = st.checkbox("Relative depth (layer / number of layers): overlay models of different depth")
results = {n: computed[n] if n in computed else load_json(available[n]) for n in chosen}
if not results:
    st.stop()
table = compare_table(results, metric, groups)
if relative:
    depth = {n: r["model"]["n_layers"] for n, r in results.items()}
    table = table.assign(layer=table.layer / table.model.map(depth))
fig = compare_figure(table, metric)
if relative:
    fig.update_layout(xaxis_title="relative depth")
st.plotly_chart(fig, width="stretch")
st.subheader("Summary per model")
summary = depth_summary(results)
if any(list(groups.values()).count(groups[n]) > 1 for n in results if n in groups):
    intervals = depth_intervals(summary, groups, seeds)
    bar_metric = st.selectbox("Summary metric", SUMMARY_METRICS, format_func=lambda k: SUMMARY_TITLES[k])
    st.plotly_chart(interval_bars(intervals, bar_metric), width="stretch")
    st.dataframe(intervals, width="stretch")
    names = list(dict.fromkeys(intervals.model))
    reference = st.selectbox("Paired differences against (same seed, same batches)", names)
    st.dataframe(depth_paired(summary, groups, seeds, pairs=[(n, reference) for n in names if n != reference]),
                 width="stretch")
    with st.expander("Every run"):
        st.dataframe(summary, width="stretch")
else:
    st.dataframe(summary, width="stretch")
with st.expander("Tidy table"):
    st.dataframe(table, width="stretch")
    st.download_button("CSV", table.to_csv(index=False), file_name=f"depth_{metric}.csv")
st.caption("Diagnostics: " + json.dumps({n: str(p) for n, p in available.items()}))
