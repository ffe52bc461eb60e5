"""What every page shares: where the zoo and the results are (one discovery, :func:`catalog`), cached
loaders, the missing-results message."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from workbench.catalog import Catalog, discover, read_result
from workbench.demo import DEFAULT_RESULTS, dashboard_command
from workbench.errors import WorkbenchError


def _argv(flag: str) -> str | None:
    """``streamlit run app.py -- --results DIR --zoo DIR`` passes its flags through sys.argv."""
    args = sys.argv[1:]
    if flag in args and args.index(flag) + 1 < len(args):
        return args[args.index(flag) + 1]
    return None


def _sidebar_dir(key: str, label: str, default, help: str) -> Path:
    """A folder typed in the sidebar, kept across pages (``default()`` only fills it the first time).

    Streamlit drops a widget's state when another page runs, so the value lives under its own key and
    re-seeds the widget on every run; typing into the box writes it back."""
    kept = f"kept_{key}"
    if kept not in st.session_state:
        st.session_state[kept] = default()
    st.session_state[key] = st.session_state[kept]
    st.sidebar.text_input(label, key=key, help=help, on_change=_keep, args=(key,))
    return Path(st.session_state[kept])


def _keep(key: str) -> None:
    st.session_state[f"kept_{key}"] = st.session_state[key]


def results_dir() -> Path:
    return _sidebar_dir("results_dir", "Results directory",
                        lambda: _argv("--results") or os.environ.get("WORKBENCH_RESULTS") or DEFAULT_RESULTS,
                        "what `workbench demo` wrote (manifest.json), and where these pages write what they compute")


def catalog() -> Catalog:
    """The models of the sidebar's zoo and of the results manifest, with every stored result
    (:func:`workbench.catalog.discover`, the one discovery every page uses); call it once a page."""
    results = results_dir()
    # The manifest names the zoo its results were made from.
    chosen = _sidebar_dir("zoo_dir", "Zoo directory", lambda: _argv("--zoo") or os.environ.get("WORKBENCH_ZOO")
                          or str(discover(results).zoo), "written by `workbench zoo` (`make zoo`: zoo/tiny)")
    cat = discover(results, chosen)
    for problem in cat.problems:
        st.sidebar.error(problem)
    st.sidebar.caption(f"{len(cat.zoo_labels())} models in `{cat.zoo}`"
                       + ("; results of `workbench demo` found" if cat.manifest else ""))
    return cat


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(show_spinner=False)
def read_json(path: str, mtime: float) -> dict:  # mtime: a changed file is re-read
    return read_result(path)


def load_json(path: str | Path) -> dict:
    return read_json(str(path), _mtime(Path(path)))


@st.cache_data(show_spinner=False)
def _read_csv(path: str, mtime: float):
    import pandas as pd

    return pd.read_csv(path)


def load_csv(path: str | Path):
    return _read_csv(str(path), _mtime(Path(path)))


@st.cache_resource(show_spinner="Loading model…")
def load_model(spec: str):
    """A spec typed into a page, read only: nothing is downloaded or written (``hf:NAME`` must be cached,
    ``smollm2`` fetched with ``workbench fetch smollm2``)."""
    import workbench

    return workbench.load(spec, download=False)


@st.cache_data(show_spinner="Diagnosing…")
def diagnose_spec(spec: str, tokens: int) -> dict:
    """Depth diagnostics of any model spec on ``tokens`` validation tokens (one window per batch)."""
    from workbench.analysis.depth import diagnose

    return diagnose(load_model(spec), tokens=tokens, batch_size=1, grad_batches=1, model_id=spec)


def choose_model(cat: Catalog, key: str):
    """The page's model: one of the catalog's, or any spec typed in (``?model=SPEC`` in the address opens the
    page on it: a link to share, or a test to drive); Pre-LN first where there is one. Returns (label, model);
    a model that cannot be loaded is one line on the page, which stops."""
    models = dict(cat.models)  # the zoo's members, then the demo's models
    custom = st.text_input("Or any model (run directory, Hugging Face directory, smollm2 or hf:NAME)",
                           value=st.query_params.get("model", ""), key=f"{key}_spec")
    if custom:
        models[custom] = custom
    if not models:
        missing(f"No models in `{cat.zoo}`, and none typed above.", f"workbench zoo --preset tiny --out {cat.zoo}")
    names = list(models)
    index = names.index(custom) if custom else names.index("pre-ln") if "pre-ln" in names else 0
    name = st.selectbox("Model", names, index=index)
    try:
        return name, load_model(models[name])
    except WorkbenchError as e:
        st.error(str(e))
        st.stop()


def missing(what: str, command: str) -> None:
    """Tell the user which command produces the results this page needs, and stop the page."""
    d = st.session_state.get("kept_results_dir", DEFAULT_RESULTS)
    st.info(f"{what} Produce it with:\n\n```\n{command}\n```\n\nor everything at once with "
            f"`workbench demo --results {d}` (then `{dashboard_command(d)}`).")
    st.stop()
