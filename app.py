"""workbench dashboard: `streamlit run app.py`. Draws what the library computes; computes nothing itself.

This first page shows a zoo's loss curves and final losses; the analysis pages arrive with their issues.
"""

from pathlib import Path

import streamlit as st

from workbench.zoo import ZOO_FILE, collect_existing, loss_figure, loss_table

st.set_page_config(page_title="workbench — normalization zoo", layout="wide")
st.title("Normalization zoo")

zoo_dir = Path(st.text_input("Zoo directory", value="zoo/tiny"))
results = collect_existing(zoo_dir)
if not results:
    st.info(f"No trained models in `{zoo_dir}`. Train the tiny zoo with:\n\n"
            f"`workbench zoo --preset tiny --out {zoo_dir}`")
    st.stop()

chosen = st.multiselect("Models", list(results), default=list(results))
st.plotly_chart(loss_figure(loss_table(zoo_dir, chosen)), use_container_width=True)
st.dataframe(
    [{"norm": n, **{k: results[n].get(k) for k in ("final_val_loss", "diverged", "diverged_at_step", "steps", "seconds")}}
     for n in chosen],
    use_container_width=True,
)
if (zoo_dir / ZOO_FILE).exists():
    st.caption(f"from {zoo_dir / ZOO_FILE}")
