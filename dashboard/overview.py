"""Overview, the app's main page: what the zoo and the results directory hold, and where each page stands."""

import streamlit as st

from dashboard.common import catalog

st.title("Normalization in transformers")
cat = catalog()
zoo = cat.zoo_labels()
if zoo:
    st.markdown(f"**{len(zoo)} models** in the zoo `{cat.zoo}`: {', '.join(zoo)}.")
else:
    st.info(f"No trained models in `{cat.zoo}` yet. Train the tiny zoo (about 5 minutes on 2 CPU cores) with\n\n"
            f"```\nworkbench zoo --preset tiny --out {cat.zoo}\n```\n\nor set the zoo directory in the sidebar.")
st.markdown(f"Results directory `{cat.results}`: "
            + ("the results of `workbench demo`, and what these pages computed." if cat.manifest else
               "no `workbench demo` results; the pages compute what the zoo's small models need, on request."))


def have(kind: str) -> str:
    n = sum(label in cat.found[kind] for label in cat.models)
    return f"{n} of {len(cat.models)} models" if cat.models else "no models"


PAGES = [
    ("dashboard/zoo.py", "Zoo", "validation loss curves, final loss and divergence of every norm",
     f"{len(zoo)} models"),
    ("dashboard/depth.py", "Depth", "residual variance, gradient norms, angular distance, layer-skip ΔCE",
     f"diagnosed: {have('diagnose')}"),
    ("dashboard/removal.py", "LayerNorm removal", "fine-tuning the norms away; CE and DLA before and after",
     f"removed: {have('removal')}"),
    ("dashboard/attribution.py", "Attribution", "direct logit attribution of any prompt, computed live",
     f"{len(cat.models)} models"),
    ("dashboard/languages.py", "Language Ranker", "how close each language's representation is to English",
     f"ranked: {have('languages')}"),
]
for path, title, what, status in PAGES:
    c1, c2 = st.columns([1, 3])
    c1.page_link(path, label=title)
    c2.markdown(f"{what} — *{status}*")
st.caption("A page whose result is missing computes it for a small model when asked (seconds to a minute), "
           "and gives the command for a large one.")
