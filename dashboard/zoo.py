"""Zoo: loss curves, final validation loss and divergence per normalization."""

from pathlib import Path

import streamlit as st

from dashboard.common import manifest, missing
from workbench.zoo import collect_existing, loss_figure, loss_table

st.title("Normalization zoo")
m = manifest() or {}
zoo_dir = Path(st.text_input("Zoo directory", value=m.get("zoo", "zoo/tiny")))
results = collect_existing(zoo_dir)
if not results:
    missing(f"No trained models in `{zoo_dir}`.", f"workbench zoo --preset tiny --out {zoo_dir}")

chosen = st.multiselect("Models", list(results), default=list(results))
st.plotly_chart(loss_figure(loss_table(zoo_dir, chosen)), width="stretch")
uni = next(iter(results.values())).get("unigram_val_loss")
fields = ("final_val_loss", "final_val_loss_lo", "final_val_loss_hi", "diverged", "diverged_at_step", "steps", "seconds",
          "dtype")
st.dataframe(
    [{"norm": n, "seeds": len(results[n].get("seeds") or {0: None}), **{k: results[n].get(k) for k in fields}}
     for n in chosen],
    width="stretch",
)
if any(results[n].get("seeds") for n in chosen):
    st.caption("Several seeds: curves are the seeds' mean, the band and lo/hi the 95% Student-t interval.")
if uni is not None:
    st.caption(f"Unigram baseline on the validation split: {uni:.4f} nats. From `{zoo_dir}`.")
