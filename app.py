"""workbench dashboard: `streamlit run app.py [-- --results DIR] [--zoo DIR]`. Pages only call workbench and draw.

DIR (default results/demo, or $WORKBENCH_RESULTS) is what `workbench demo` writes and where the pages write
what they compute; the zoo (default: the manifest's, else zoo/tiny, or $WORKBENCH_ZOO) is `make zoo`'s.
"""

import streamlit as st

st.set_page_config(page_title="workbench — normalization in transformers", layout="wide")
# The main page has no path of its own (it is "/"), so it is an overview rather than the Zoo page: every
# page, Zoo included, must open at its own address without Streamlit's "page not found" dialog.
pages = [
    st.Page("dashboard/overview.py", title="Overview", default=True),
    st.Page("dashboard/zoo.py", title="Zoo", url_path="zoo"),
    st.Page("dashboard/depth.py", title="Depth", url_path="depth"),
    st.Page("dashboard/removal.py", title="LayerNorm removal", url_path="removal"),
    st.Page("dashboard/attribution.py", title="Attribution", url_path="attribution"),
    st.Page("dashboard/norms.py", title="Norms on a prompt", url_path="norms"),
    st.Page("dashboard/languages.py", title="Language Ranker", url_path="languages"),
]
st.navigation(pages).run()
