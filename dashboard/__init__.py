"""The Streamlit dashboard's pages (run with `streamlit run app.py`). Pages only call workbench and draw."""
