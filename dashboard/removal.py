"""LayerNorm removal: the schedule, CE of original / control / LN-free, DLA before and after."""

from pathlib import Path

import streamlit as st

from dashboard.common import catalog, load_model, missing
from dashboard.live import offer
from workbench.analysis.display import REMOVAL_CE, SCHEDULE, worded
from workbench.analysis.dla import direct_logit_attribution, top_tokens
from workbench.analysis.figures import dla_bars
from workbench.analysis.prompts import load_prompts, usable
from workbench.errors import WorkbenchError
from workbench.live import check_removable_spec, plan
from workbench.removal.report import ce_table, read_removal, removal_figure

st.title("LayerNorm removal")
cat = catalog()
runs = dict(cat.found["removal"])  # model label → its remove-ln directory


def removable(label: str) -> bool:
    try:
        check_removable_spec(cat.models[label])
        return True
    except WorkbenchError:
        return False


candidates = [n for n in cat.zoo_labels() if n not in runs and removable(n)]
custom = st.text_input("Or another remove-ln output directory", value="", key="removal_dir")
if custom:
    runs[Path(custom).name] = custom
names = [*runs, *candidates]
if not names:
    missing(f"No LayerNorm-removal run, and no Pre-norm model in `{cat.zoo}` to remove the norms of.",
            f"workbench zoo --preset tiny --norms pre-ln --out {cat.zoo}")
index = names.index(Path(custom).name) if custom else 0
name = st.selectbox("Model", names, index=index, format_func=lambda n: n if n in runs else f"{n} (not removed yet)")
if name not in runs:
    if offer([plan(cat, "removal", name)], f"LayerNorm removal of {name}", "removal_compute"):
        st.rerun()
    st.stop()
try:
    summary, schedule, metrics = read_removal(runs[name])
except WorkbenchError as e:
    st.error(str(e))
    st.stop()

c1, c2, c3, c4 = st.columns(4)
c1.metric("CE original", f"{summary['ce_original']:.3f}")
if summary.get("ce_control") is not None:
    c2.metric("CE control", f"{summary['ce_control']:.3f}")
gap = summary.get("ce_ln_free_minus_control")
c3.metric("CE LN-free", f"{summary['ce_ln_free']:.3f}", delta=f"{gap:+.3f} vs control" if gap is not None else None,
          delta_color="inverse")
frac = summary.get("token_fraction")
c4.metric("Fine-tuning tokens", f"{summary['tokens_used']:,}", delta=f"{100 * frac:.1f}% of pre-training" if frac else None,
          delta_color="off")
st.plotly_chart(removal_figure(metrics, schedule), width="stretch")
left, right = st.columns(2)
left.subheader("Cross-entropy (validation)")
left.dataframe(worded(ce_table(summary), REMOVAL_CE), width="stretch", hide_index=True)
right.subheader("Schedule")
right.dataframe(worded(schedule, SCHEDULE), width="stretch", height=260,
                hide_index=True)

st.subheader("Direct logit attribution before and after")
source = summary.get("source")
loaded = {}
for label, spec in (("original", source), ("LN-free", runs[name])):
    if not spec:
        continue
    try:
        loaded[label] = load_model(str(spec))
    except WorkbenchError as e:
        st.info(f"The {label} model ({spec}) cannot be loaded here ({e}); it is not shown.")
if not loaded:
    st.stop()
fits = [p for p in load_prompts() if all(usable(mm, p) for mm in loaded.values())]
default = fits[0] if fits else load_prompts()[0]
prompt = st.text_input("Prompt", value=default.prompt)
first = next(iter(loaded.values()))
c1, c2 = st.columns(2)
answer = c1.text_input("Answer token", value=default.answer if fits else top_tokens(first, prompt)[0])
contrast = c2.text_input("Contrast token (optional)", value=default.contrast if fits else "")
cols = st.columns(len(loaded))
for col, (label, model) in zip(cols, loaded.items()):
    try:
        r = direct_logit_attribution(model, prompt, answer, contrast or None)
    except WorkbenchError as e:
        col.warning(f"{label}: {e}")
        continue
    col.metric(f"{label}: NMAE (DLA vs direct effect)", f"{r.nmae:.3g}")
    col.plotly_chart(dla_bars(r.table, top=15, title=f"{label}: {answer!r}" + (f" − {contrast!r}" if contrast else "")),
                     width="stretch")
