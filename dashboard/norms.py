"""Norms on a prompt: every norm site's scale per token × layer, and the logit lens with ln_final recomputed
on each layer's residual beside the last layer's scale frozen onto it."""

import streamlit as st

from dashboard.common import catalog, choose_model
from workbench.analysis.figures import logit_lens_map, norm_scale_map
from workbench.analysis.norm_sites import (LENS_VALUES, NO_FROZEN, lens_side_by_side, logit_lens, norm_scales,
                                           prompt_tokens)
from workbench.analysis.prompts import load_prompts
from workbench.errors import WorkbenchError

st.title("Norms on a prompt")
cat = catalog()
name, model = choose_model(cat, "norms")
c1, c2 = st.columns([3, 1])
prompt = c1.text_input("Prompt", value=load_prompts()[0].prompt, key="norms_prompt")
answer = c2.text_input("Answer token (optional)", value="", key="norms_answer",
                       help="a single token, e.g. ' earth': its log-probability and rank at every layer")
try:
    prompt_tokens(model, prompt, min_tokens=2)
except WorkbenchError as e:
    st.error(str(e))
    st.stop()

st.subheader("Norm scales per token")
st.caption("Each site's scale (what it divides by) relative to that site's median over the prompt's tokens, "
           "log colour: red tokens are divided by more than usual — BOS, end-of-text, massive activations.")
try:
    scales = norm_scales(model, prompt)
except WorkbenchError as e:  # a norm-free, DyT or batch-statistics model: nothing per token to show
    st.info(str(e))
    scales = None
if scales is not None:
    for kind in scales.kind[scales.skipped.isna()].unique():
        st.plotly_chart(norm_scale_map(scales, kind), width="stretch")
    for site, why in scales[scales.skipped.notna()][["site", "skipped"]].itertuples(index=False):
        st.caption(f"`{site}` not shown: {why}")
    with st.expander("Tidy table"):
        st.dataframe(scales, width="stretch", hide_index=True)
        st.download_button("CSV", scales.to_csv(index=False), file_name="norm_scales.csv")

st.subheader("Logit lens")
try:
    lens = logit_lens(model, prompt, answer or None)
except WorkbenchError as e:  # an answer that is not one token
    st.error(str(e))
    st.stop()
values = [v for v in LENS_VALUES if v in lens]
value = st.radio("Colour", values, format_func=LENS_VALUES.get, horizontal=True, key="norms_lens_value")
left, right = st.columns(2)
left.plotly_chart(logit_lens_map(lens, "recomputed", value), width="stretch")
if "frozen" in set(lens.method):
    right.plotly_chart(logit_lens_map(lens, "frozen", value), width="stretch")
else:
    right.info(NO_FROZEN[0].upper() + NO_FROZEN[1:] + ".")
st.caption("Recomputed: ln_final's statistic computed on that layer's own residual. Frozen: the last layer's "
           "cached scale applied to it (TransformerLens' bug #1076 did this).")
st.markdown("**Last position, layer by layer**")
st.dataframe(lens_side_by_side(lens), width="stretch", hide_index=True)
with st.expander("Tidy table"):
    st.dataframe(lens, width="stretch", hide_index=True)
    st.download_button("CSV", lens.to_csv(index=False), file_name="logit_lens.csv")
