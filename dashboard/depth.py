"""Depth: residual variance, gradient norms, angular distance and layer-ablation ΔCE, overlaid."""

from pathlib import Path

import streamlit as st

from dashboard.common import catalog, diagnose_spec, load_json, missing
from dashboard.live import offer
from workbench.analysis.compare import (METRICS, SUMMARY_METRICS, SUMMARY_TITLES, compare_figure, compare_table,
                                        depth_intervals, depth_paired, depth_summary, interval_bars)
from workbench.analysis.display import DEPTH_SUMMARY, paired, seed_intervals, worded
from workbench.catalog import discover
from workbench.errors import WorkbenchError
from workbench.live import plan
from workbench.zoo import run_groups, run_seeds

st.title("Depth diagnostics")
base = catalog()
# The demo's deep (12-layer) members first: two blocks of the tiny zoo show no depth effect.
zoo_dir = Path(st.text_input("Zoo directory for this page", value=base.manifest.get("depth_zoo") or str(base.zoo),
                             key="depth_zoo", help="the demo's 12-layer members (zoo/small) where it made them"))
cat = discover(base.results, zoo_dir)
extra = st.text_input("More diagnose results (LABEL=FILE.json, comma-separated)", value="", key="depth_extra",
                      help="e.g. smollm2=results/smollm2_diagnose.json from `workbench diagnose smollm2 --out …`")
spec = st.text_input("Or diagnose any model (run directory, Hugging Face directory, smollm2 or hf:NAME)",
                     value=st.query_params.get("model", ""), key="depth_spec")  # ?model=SPEC in the address
spec_tokens = st.number_input("Tokens for that model", min_value=64, max_value=65536, value=1024, step=64)

zoo_labels = cat.zoo_labels()
# The zoo's members, and the models the demo diagnosed beside it (SmolLM2).
shown = {*zoo_labels, *(cat.manifest.get("diagnostics") or {})}
available = {n: p for n, p in cat.found["diagnose"].items() if n in shown}
for problem in set(cat.problems) - set(base.problems):  # the sidebar shows the others
    st.error(problem)
try:
    groups, seeds = run_groups(zoo_dir), run_seeds(zoo_dir)  # a zoo trained with --seeds: one group per norm
except WorkbenchError:  # a damaged member, said above
    groups, seeds = {}, {}
for item in filter(None, (s.strip() for s in extra.split(","))):
    label, _, path = item.rpartition("=")
    if Path(path).is_file():
        available[label or Path(path).stem] = Path(path)
    else:
        st.error(f"`{path}` not found; make it with `workbench diagnose MODEL --out {path}`")
todo = [plan(cat, "diagnose", n) for n in zoo_labels if n not in available]
if offer(todo, f"Depth diagnostics of {len(todo)} model{'s' * (len(todo) > 1)} of `{zoo_dir}`", "depth_compute"):
    st.rerun()
computed = {}
if spec:
    try:
        computed[spec] = diagnose_spec(spec, int(spec_tokens))
    except WorkbenchError as e:
        st.error(str(e))
if not available and not computed:
    if not zoo_labels:
        missing(f"No models in `{zoo_dir}`.", f"workbench zoo --preset tiny --out {zoo_dir}")
    st.stop()

metric = st.selectbox("Metric", list(METRICS), format_func=lambda k: METRICS[k][1])
chosen = st.multiselect("Models", [*available, *computed], default=[*available, *computed])
relative = st.checkbox("Relative depth (layer / number of layers): overlay models of different depth")
try:
    results = {n: computed[n] if n in computed else load_json(available[n]) for n in chosen}
except WorkbenchError as e:
    st.error(str(e))
    st.stop()
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
    st.dataframe(seed_intervals(intervals), width="stretch", hide_index=True)
    names = list(dict.fromkeys(intervals.model))
    reference = st.selectbox("Paired differences against (same seed, same batches)", names)
    st.dataframe(paired(depth_paired(summary, groups, seeds, pairs=[(n, reference) for n in names if n != reference])),
                 width="stretch", hide_index=True)
    with st.expander("Every run"):
        st.dataframe(worded(summary, DEPTH_SUMMARY), width="stretch", hide_index=True)
else:
    st.dataframe(worded(summary, DEPTH_SUMMARY), width="stretch", hide_index=True)
with st.expander("Tidy table"):
    st.dataframe(table, width="stretch", hide_index=True)
    st.download_button("CSV", table.to_csv(index=False), file_name=f"depth_{metric}.csv")
