"""Attribution: DLA per component beside its direct effect, NMAE, heads as a layer × head grid."""

from pathlib import Path

import streamlit as st

from dashboard.common import catalog, choose_model, load_csv
from workbench.analysis.display import ATTRIBUTION, COMPONENTS, worded
from workbench.analysis.dla import direct_logit_attribution, top_tokens
from workbench.analysis.figures import dla_bars, head_grid
from workbench.analysis.prompts import load_prompts
from workbench.errors import WorkbenchError

st.title("Direct logit attribution")
cat = catalog()
report = cat.manifest.get("attribution")
if report and Path(report).is_file():
    with st.expander("Across models: DLA error on the bundled prompts, patching agreement, confidence neurons"):
        st.dataframe(worded(load_csv(report), ATTRIBUTION), width="stretch", hide_index=True)
# Pre-LN first where there is one: DLA is defined for it (a Post-LN model's is not; it gets one line).
name, model = choose_model(cat, "attribution")
default = load_prompts()[0]
prompt = st.text_input("Prompt", value=default.prompt)
try:
    top = top_tokens(model, prompt)
except WorkbenchError as e:
    st.warning(str(e))
    st.stop()
c1, c2 = st.columns(2)
answer = c1.text_input("Answer token", value=top[0],
                       help="default: the model's top prediction; top 5: " + ", ".join(map(repr, top)))
contrast = c2.text_input("Contrast token (optional)", value="")
try:
    r = direct_logit_attribution(model, prompt, answer, contrast or None)
except WorkbenchError as e:
    st.warning(str(e))
    st.stop()
c1, c2, c3 = st.columns(3)
c1.metric("logit" + (" difference" if contrast else ""), f"{r.logit:+.3f}")
c2.metric("sum of DLA", f"{r.dla_sum:+.3f}")
c3.metric("NMAE (DLA vs direct effect)", f"{r.nmae:.3g}",
          help="0 when the final norm is linear (LN-free or no norm); large when the norm's scale couples components")
st.plotly_chart(dla_bars(r.table, title=f"{name}: {answer!r}" + (f" − {contrast!r}" if contrast else "")),
                width="stretch")
HEAD_VALUES = {"dla": "DLA (norm frozen)", "direct_effect": "direct effect (norm recomputed)"}
value = st.radio("Head grid shows", list(HEAD_VALUES), horizontal=True, format_func=HEAD_VALUES.get)
st.plotly_chart(head_grid(r.table, value=value, title=f"{HEAD_VALUES[value]} per head (logits)"), width="stretch")
with st.expander("All components"):
    st.dataframe(worded(r.table, COMPONENTS), width="stretch", hide_index=True)
