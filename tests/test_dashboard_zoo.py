"""The dashboard right after `make zoo`, without `workbench demo`: every page shows a result for a zoo
member — Depth, LayerNorm removal and Language Ranker after one click that computes it, writing the file
the CLI command writes into the results directory and nowhere else — and a second visit reads it."""

import json
import shlex
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import workbench.live
from conftest import ROOT, TINY_MODEL, TINY_TRAIN
from test_dashboard import _plotly_array, charts
from test_dashboard_readonly import tree
from workbench.batches import cache_dir
from workbench.catalog import discover
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_corpus):
    from workbench.zoo import train_zoo

    d = tmp_path_factory.mktemp("made") / "tiny"
    train_zoo(d, norms="pre-ln,post-ln,none", steps=4, corpus=str(tiny_corpus), progress=False, log=lambda *_: None,
              model_overrides={**TINY_MODEL, "n_ctx": 64}, train_overrides=TINY_TRAIN)
    return d


@pytest.fixture
def fresh(tmp_path, zoo, monkeypatch):
    """An empty results directory and the zoo, as the served app gets them (environment variables)."""
    results = tmp_path / "results"
    monkeypatch.setenv("WORKBENCH_RESULTS", str(results))
    monkeypatch.setenv("WORKBENCH_ZOO", str(zoo))
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT))
    import streamlit as st

    st.cache_data.clear()
    yield results
    sys.path.remove(str(ROOT))


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "dashboard" / f"{name}.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def compute(name: str) -> AppTest:
    """Open the page, check it offers to compute (and names the CLI command), click, and return the page."""
    at = page(name)
    assert [b.label for b in at.button] and at.button[0].label.startswith("Compute now"), name
    assert "workbench " in at.info[0].value and "not computed yet" in at.info[0].value
    at.button[0].click().run()
    assert not at.exception and not at.error, (name, at.exception, [e.value for e in at.error])
    return at


def cli_result(command: str, out: Path) -> dict:
    """Run the page's own command line through the CLI, into ``out`` instead."""
    from workbench.cli import main

    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_depth_and_languages_computed_live_equal_the_cli_and_are_read_on_a_second_visit(fresh, zoo, tmp_path,
                                                                                         monkeypatch):
    """One click each; the files equal what the printed command writes; a second visit computes nothing."""
    before = tree(zoo, cache_dir())
    at = compute("depth")
    cat = discover(fresh, zoo)
    assert set(cat.found["diagnose"]) == {"pre-ln", "post-ln", "none"}
    written = json.loads(cat.path_for("diagnose", "pre-ln").read_text())
    reference = cli_result(workbench.live.plan(cat, "diagnose", "pre-ln").command, tmp_path / "cli.json")
    assert written == reference
    curves = json.loads(charts(at)[0])["data"]
    pre = next(t for t in curves if t["name"] == "pre-ln")
    assert list(_plotly_array(pre["y"])) == [r["resid_var_pos1"] for r in reference["residual"]["layers"]]

    at = compute("languages")
    cat = discover(fresh, zoo)
    written = json.loads(cat.path_for("languages", "pre-ln").read_text())
    reference = cli_result(workbench.live.plan(cat, "languages", "pre-ln").command, tmp_path / "cli_rank.json")
    assert {k: v for k, v in written.items() if k != "seconds"} == {k: v for k, v in reference.items() if k != "seconds"}
    assert len(written["languages"]) == 10 and cat.path_for("languages", "pre-ln").with_suffix(".html").is_file()
    table = at.dataframe[0].value
    assert list(table.Code) == [r["code"] for r in sorted(written["languages"], key=lambda r: r["rank"])]

    def refuse(self):
        raise AssertionError("a second visit computed again")

    monkeypatch.setattr(workbench.live.Job, "run", refuse)
    for name, n_charts in (("depth", 1), ("languages", 2)):
        at = page(name)
        assert not [b for b in at.button if b.label.startswith("Compute")] and len(at.get("plotly_chart")) == n_charts
    assert tree(zoo, cache_dir()) == before, "a page wrote outside the results directory"


def test_removal_computed_live(fresh, zoo):
    """A tiny Pre-LN removal from the page: the LN-free model's DLA is exact (NMAE ≈ 0), and it joins the
    models the other pages list; Post-LN, which remove-ln refuses, is not offered."""
    at = page("removal")
    assert at.selectbox[0].options == ["pre-ln (not removed yet)"]  # post-ln refused, none has no norm
    at = compute("removal")
    summary = json.loads((discover(fresh, zoo).path_for("removal", "pre-ln") / "summary.json").read_text())
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["CE LN-free"] == f"{summary['ce_ln_free']:.3f}" and summary["source"] == str(zoo / "pre-ln")
    assert float(metrics["LN-free: NMAE (DLA vs direct effect)"]) < 1e-4
    assert "pre-ln LN-free" in discover(fresh, zoo).models
    assert "pre-ln LN-free" in page("attribution").selectbox[0].options


def test_attribution_lists_the_zoo_and_attributes_live(fresh, zoo):
    at = page("attribution")
    assert at.selectbox[0].options == ["pre-ln", "post-ln", "none"] and at.selectbox[0].value == "pre-ln"
    assert len(at.get("plotly_chart")) == 2 and not at.warning
    at.selectbox[0].set_value("none").run()
    assert float(next(m for m in at.metric if "NMAE" in m.label).value) < 1e-4  # no norm: DLA is exact


def test_expensive_jobs_give_their_time_and_command_and_no_button(fresh, monkeypatch):
    monkeypatch.setattr(workbench.live, "CHEAP_SECONDS", 0.0)
    for name, command in (("depth", "workbench diagnose"), ("removal", "workbench remove-ln"),
                          ("languages", "workbench rank-languages")):
        at = page(name)
        assert not at.button and command in at.info[0].value and "on 2 CPU cores" in at.info[0].value, name
    assert not fresh.exists()


def test_a_failing_job_is_one_line(fresh, monkeypatch):
    def fail(self):
        raise WorkbenchError("the model file is damaged;\nre-train it")

    monkeypatch.setattr(workbench.live.Job, "run", fail)
    at = page("languages")
    at.button[0].click().run()
    assert not at.exception and at.error and "\n" not in at.error[0].value and "damaged" in at.error[0].value


def test_a_corrupt_result_is_one_line(fresh, zoo):
    path = discover(fresh, zoo).path_for("languages", "pre-ln")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    at = page("languages")
    assert at.error and "cannot be read" in at.error[0].value and "\n" not in at.error[0].value


def test_a_damaged_zoo_member_is_one_line_on_every_page(fresh, zoo, tmp_path, monkeypatch):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(zoo / "pre-ln", damaged / "pre-ln")
    (damaged / "pre-ln" / "summary.json").write_text("{cut short")
    monkeypatch.setenv("WORKBENCH_ZOO", str(damaged))
    for name in ("zoo", "depth", "removal", "attribution", "norms", "languages"):
        at = page(name)
        assert at.error and "corrupt" in at.error[0].value and "\n" not in at.error[0].value, name


def test_zoo_page_reads_in_words(fresh, zoo):
    """Worded headers, no None cells for a one-seed zoo, validation curves only until the toggle."""
    at = page("zoo")
    table = at.dataframe[0].value
    assert "Validation loss (nats)" in table.columns and not table.isna().any().any()
    summary = json.loads((zoo / "none" / "summary.json").read_text())
    assert table.set_index("Normalization").loc["none", "Validation loss (nats)"] == f"{summary['final_val_loss']:.3f}"
    lines = [t for t in json.loads(charts(at)[0])["data"] if t.get("mode") == "lines"]
    assert len(lines) == 3 and all(t["line"]["dash"] == "solid" for t in lines)
    at.toggle(key="zoo_train").set_value(True).run()
    lines = [t for t in json.loads(charts(at)[0])["data"] if t.get("mode") == "lines"]
    assert len(lines) == 6 and sum(t.get("showlegend", True) for t in lines) == 3


def test_main_page_and_zoo_page_through_the_app(fresh, zoo):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception and "3 models" in at.markdown[0].value
    at.text_input(key="zoo_dir").set_value(str(zoo.parent / "missing")).run()
    assert not at.exception and "workbench zoo --preset tiny" in at.info[0].value
    at.text_input(key="zoo_dir").set_value(str(zoo))
    at.switch_page("dashboard/zoo.py").run()
    assert not at.exception and at.multiselect[0].value == ["pre-ln", "post-ln", "none"]



def test_every_page_after_make_zoo_alone_in_headless_chromium(fresh, zoo, tmp_path, monkeypatch):
    """Each page at its own address (the main page at /), no error, warning or dialog; the three pages
    that compute do so on one click, and on the next visit show the stored result without offering again.
    A canary address that no page has must be seen failing: Streamlit's "page not found" dialog."""
    import dashboard.browser as browser
    from test_dashboard import ARTIFACTS, PAGES, _chromium, _free_port

    monkeypatch.setitem(browser.PATHS, "canary", "no-such-page")
    monkeypatch.setitem(browser.TITLES, "canary", browser.TITLES["overview"])  # it falls back to the main page
    exe, driver = _chromium()
    shots = browser.screenshot_pages(fresh, ARTIFACTS / "zoo-only", [*PAGES, "canary"], exe, driver,
                                     port=_free_port(), profile=tmp_path / "profile", zoo=zoo, compute=True)
    canary = shots.pop("canary")
    assert any("Page not found" in e for e in canary["errors"]), canary
    assert set(shots) == set(PAGES)
    for name, shot in shots.items():
        assert shot["errors"] == [] and shot["title_found"] and not shot["offers"], (name, shot)
    assert {name for name, shot in shots.items() if shot["computed"]} == {"depth", "removal", "languages"}
    assert set(discover(fresh, zoo).found["languages"]) == {"pre-ln"}
