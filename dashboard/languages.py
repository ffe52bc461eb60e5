"""Language Ranker: ranking table, per-layer heat map, score against bits per English byte."""

from pathlib import Path

import streamlit as st

from dashboard.common import catalog, load_json, missing
from dashboard.live import offer
from workbench.analysis.display import ranking
from workbench.errors import WorkbenchError
from workbench.languages.figures import layer_heatmap, score_vs, signed_or_na, spearman_text
from workbench.languages.ranker import layer_table, ranking_table
from workbench.live import plan

st.title("Language Ranker")
cat = catalog()
files = dict(cat.found["languages"])  # model label → its rank-languages result
custom = st.text_input("Or a rank-languages result (FILE.json)", value="", key="languages_file")
if custom:
    if Path(custom).is_file():
        files[Path(custom).stem] = custom
    else:
        st.error(f"`{custom}` not found")
candidates = [n for n in cat.local_labels() if n not in files]
names = [*files, *candidates]
if not names:
    missing(f"No Language Ranker results, and no models in `{cat.zoo}` to rank languages with.",
            f"workbench zoo --preset tiny --out {cat.zoo}")
name = st.selectbox("Model", names, index=names.index("smollm2") if "smollm2" in names else 0,
                    format_func=lambda n: n if n in files else f"{n} (not ranked yet)")
if name not in files:
    if offer([plan(cat, "languages", name)], f"Ten-language ranking of {name}", "languages_compute"):
        st.rerun()
    st.stop()
try:
    result = load_json(files[name])
except WorkbenchError as e:
    st.error(str(e))
    st.stop()
table = ranking_table(result)
# Results made before retrieval existed have the cosine score only: offer what this result has.
LABELS = {"score": "cosine score", "retrieval": "retrieval (MEXA)"}
have = [k for k in LABELS if k in table.columns]
y = have[0] if len(have) == 1 else st.radio("Metric", have, index=have.index(result.get("ranked_by", "score")),
                                            format_func=LABELS.get, horizontal=True)
x = "share" if f"spearman_{y}_vs_log_share" in result else "bits_per_english_byte"
vs = "log_share" if x == "share" else x
vs_label = "log share" if x == "share" else "bits per English byte"
rho = spearman_text(result, y, vs)
c1, c2, c3 = st.columns(3)
c1.metric("languages", len(table))
c2.metric(f"Spearman ρ: {LABELS[y]} vs {vs_label}", signed_or_na(result.get(f"spearman_{y}_vs_{vs}")),
          help=f"{rho} (95 % bootstrap interval over languages)")
c3.metric("pooling / unit / centering", f"{result['pooling']} / {result['unit']} / {result.get('center', 'none')}")
definition = result.get("retrieval_definition" if y == "retrieval" else "score_definition", "")
chance = sorted({r["retrieval_chance"] for r in result["languages"] if "retrieval_chance" in r})
if y == "retrieval" and chance:  # 1/(2n−1): a random row-and-column maximum, n units
    definition += f"; chance level {chance[0]:.2f}" + (f"–{chance[-1]:.2f}" if len(chance) > 1 else "")
st.caption(f"model {result['model']}, corpus {result['corpus']}; {LABELS[y]}: {definition}")
partial_key = f"partial_spearman_{y}_vs_bits_per_english_byte_given_token_ratio"
if partial_key in result:  # older results lack it; null: fewer than 4 languages
    partial = result[partial_key]
    st.caption(f"Partial Spearman ρ of {LABELS[y]} and bits per English byte given the token ratio "
               f"(tokens per English token): {signed_or_na(partial)}")
st.dataframe(ranking(table), width="stretch", height=300, hide_index=True)
top = st.slider("Languages in the heat map (best first)", 5, max(5, len(table)), min(40, max(5, len(table))))
value = "retrieval" if y == "retrieval" else "cosine"
heat_title = f"{name}: " + ("retrieval alignment" if y == "retrieval" else "cosine similarity") + " to English"
st.plotly_chart(layer_heatmap(layer_table(result), top=top, title=heat_title, value=value), width="stretch")
st.plotly_chart(score_vs(table, x=x, log_x=x == "share", y=y,
                         title=f"{LABELS[y]} vs {vs_label}: {rho}"), width="stretch")
