"""Language Ranker: ranking table, per-layer heat map, score against bits per English byte."""

from pathlib import Path

import streamlit as st

from dashboard.common import load_json, manifest, missing
from workbench.languages.figures import layer_heatmap, score_vs
from workbench.languages.ranker import layer_table, ranking_table

st.title("Language Ranker")
m = manifest() or {}
files = dict(m.get("languages", {}))
custom = st.text_input("Or a rank-languages result (FILE.json)", value="")
if custom:
    if Path(custom).is_file():
        files[Path(custom).stem] = custom
    else:
        st.warning(f"`{custom}` not found")
if not files:
    zoo = m.get("zoo", "zoo/tiny")
    missing("No Language Ranker results yet.",
            f"workbench rank-languages {zoo}/pre-ln --max-units 10 --out results/demo/languages/pre-ln.json")

names = list(files)
name = st.selectbox("Result", names, index=names.index("smollm2") if "smollm2" in names else 0)
result = load_json(files[name])
table = ranking_table(result)
rho = result.get("spearman_score_vs_bits_per_english_byte")
c1, c2, c3 = st.columns(3)
c1.metric("languages", len(table))
c2.metric("Spearman(score, bits per English byte)", "n/a" if rho is None else f"{rho:.3f}")
c3.metric("pooling / unit / centering", f"{result['pooling']} / {result['unit']} / {result.get('center', 'none')}")
st.caption(f"model {result['model']}, corpus {result['corpus']}; score: {result.get('score_definition', '')}")
st.dataframe(table, width="stretch", height=300)
top = st.slider("Languages in the heat map (best first)", 5, max(5, len(table)), min(40, max(5, len(table))))
st.plotly_chart(layer_heatmap(layer_table(result), top=top, title=f"{name}: cosine similarity to English"),
                width="stretch")
x = "share" if "spearman_score_vs_log_share" in result else "bits_per_english_byte"
st.plotly_chart(score_vs(table, x=x, log_x=x == "share"), width="stretch")
