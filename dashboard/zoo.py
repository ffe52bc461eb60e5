"""Zoo: validation loss curves, final validation loss and divergence per normalization."""

import streamlit as st

from dashboard.common import catalog, missing
from workbench.analysis.display import zoo_table
from workbench.errors import WorkbenchError
from workbench.zoo import collect_existing, loss_figure, loss_table

st.title("Normalization zoo")
zoo_dir = catalog().zoo
try:
    results = collect_existing(zoo_dir)
except WorkbenchError as e:  # a member's summary.json is damaged
    st.error(str(e))
    st.stop()
if not results:
    missing(f"No trained models in `{zoo_dir}`.", f"workbench zoo --preset tiny --out {zoo_dir}")

chosen = st.multiselect("Models", list(results), default=list(results))
train = st.toggle("Training loss too (dotted)", value=False, key="zoo_train")
splits = ("validation", "train") if train else ("validation",)
st.plotly_chart(loss_figure(loss_table(zoo_dir, chosen), splits), width="stretch")
st.dataframe(zoo_table({n: results[n] for n in chosen}), width="stretch", hide_index=True,
             column_config={"Training time (s)": st.column_config.NumberColumn(format="%.1f")})
if any(results[n].get("seeds") for n in chosen):
    st.caption("Several seeds: curves are the seeds' mean; the band and the bracket are the 95% Student-t interval.")
uni = next(iter(results.values())).get("unigram_val_loss")
if uni is not None:
    st.caption(f"Unigram baseline on the validation split: {uni:.3f} nats. From `{zoo_dir}`.")
