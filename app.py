"""workbench dashboard: `streamlit run app.py [-- --results DIR]`. Pages only call workbench and draw.

DIR (default results/demo, or $WORKBENCH_RESULTS) is what `workbench demo` writes.
"""

import streamlit as st

st.set_page_config(page_title="workbench — normalization in transformers", layout="wide")
pages = [
    st.Page("dashboard/zoo.py", title="Zoo", url_path="zoo", default=True),
    st.Page("dashboard/depth.py", title="Depth", url_path="depth"),
    st.Page("dashboard/removal.py", title="LayerNorm removal", url_path="removal"),
    st.Page("dashboard/attribution.py", title="Attribution", url_path="attribution"),
    st.Page("dashboard/languages.py", title="Language Ranker", url_path="languages"),
]
st.navigation(pages).run()
