"""What every page shares: where the results are, cached loaders, the missing-results message."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import streamlit as st

from workbench.demo import DEFAULT_RESULTS, dashboard_command, read_manifest


def _argv_results() -> str | None:
    """``streamlit run app.py -- --results DIR`` passes DIR through sys.argv."""
    args = sys.argv[1:]
    if "--results" in args and args.index("--results") + 1 < len(args):
        return args[args.index("--results") + 1]
    return None


def results_dir() -> Path:
    default = _argv_results() or os.environ.get("WORKBENCH_RESULTS") or DEFAULT_RESULTS
    if "results_dir" not in st.session_state:
        st.session_state["results_dir"] = default
    return Path(st.sidebar.text_input("Results directory", key="results_dir",
                                      help="written by `workbench demo`; see manifest.json"))


def manifest() -> dict | None:
    d = results_dir()
    m = _manifest(str(d), _mtime(d / "manifest.json"))
    if m is None:
        st.sidebar.warning(f"No results in `{d}`.")
    return m


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(show_spinner=False)
def _manifest(path: str, mtime: float) -> dict | None:  # mtime: a changed file is re-read
    return read_manifest(path)


@st.cache_data(show_spinner=False)
def read_json(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


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


def missing(what: str, command: str) -> None:
    """Tell the user which command produces the results this page needs, and stop the page."""
    d = st.session_state.get("results_dir", DEFAULT_RESULTS)
    st.info(f"{what} Produce it with:\n\n```\n{command}\n```\n\nor everything at once with "
            f"`workbench demo --results {d}` (then `{dashboard_command(d)}`).")
    st.stop()
