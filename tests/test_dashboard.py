"""The dashboard: every page under AppTest (renders, key widgets, an interaction changes the figure)
and every page in headless Chromium against a served app (no error element; screenshots saved)."""

import base64
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, TINY_MODEL, TINY_TRAIN
from workbench.demo import DemoConfig, read_manifest, run_demo

PAGES = ["overview", "zoo", "depth", "removal", "attribution", "norms", "languages"]
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(zoo=str(d / "zoo"), results=str(d / "results"), norms="pre-ln,none,post-ln", steps=4,
                     corpus=str(tiny_corpus), diagnose_tokens=256, removal_steps_per_ln=1, rank_max_units=3,
                     rank_langs="sco,ita,spa,fra,rus,cmn_hans", model_overrides={**TINY_MODEL, "n_ctx": 64},
                     train_overrides=TINY_TRAIN, smollm2=False, depth_zoo=str(d / "small"), depth_norms="pre-ln,post-ln",
                     depth_steps=4, depth_seeds="0,1,2", depth_model_overrides={**TINY_MODEL, "n_layers": 4, "n_ctx": 64})
    run_demo(cfg, progress=False, log=lambda *_: None)
    return d / "results"


def page(name: str, results: Path) -> AppTest:
    os.environ["WORKBENCH_RESULTS"] = str(results)
    os.environ.pop("WORKBENCH_ZOO", None)  # the zoo the manifest names
    sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "dashboard" / f"{name}.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def charts(at):
    return [c.proto.spec for c in at.get("plotly_chart")]


def test_demo_manifest_names_every_result(results):
    m = read_manifest(results)
    assert set(m["models"]) == {"pre-ln", "none", "post-ln", "pre-ln LN-free"}
    assert set(m["languages"]) == {"pre-ln", "none", "pre-ln LN-free"}
    assert all(Path(p).is_file() for p in m["languages"].values())
    assert (Path(m["removal"]["pre-ln"]) / "summary.json").is_file() and Path(m["attribution"]).is_file()
    assert all((Path(m["zoo"]) / n / "diagnose.json").is_file() for n in ("pre-ln", "none", "post-ln"))


def test_zoo_page(results):
    at = page("zoo", results)
    assert sorted(at.multiselect[0].value) == ["none", "post-ln", "pre-ln"]
    before = charts(at)
    at.multiselect[0].set_value(["none"]).run()
    assert not at.exception and len(at.dataframe[0].value) == 1 and charts(at) != before


def test_zoo_page_with_seeds_shows_intervals_in_one_cell(results):
    """The demo's deep zoo (three seeds a norm): "mean [lo, hi]" from the seeds' own final losses."""
    from workbench.analysis.intervals import mean_interval

    at = page("zoo", results)
    deep = Path(read_manifest(results)["depth_zoo"])
    at.text_input(key="zoo_dir").set_value(str(deep)).run()
    cells = at.dataframe[0].value.set_index("Normalization")
    losses = [json.loads((deep / "pre-ln" / f"seed{k}" / "summary.json").read_text())["final_val_loss"] for k in range(3)]
    ref = mean_interval(losses)
    assert cells.loc["pre-ln", "Validation loss (nats)"] == f"{ref['mean']:.3f} [{ref['lo']:.3f}, {ref['hi']:.3f}]"
    assert (cells.Seeds == 3).all()


def test_depth_page(results):
    """The demo's deep members (trained with 3 seeds here) by default: curves with 95 % bands, bars with
    error bars from the seeds' own values, and paired differences against a chosen norm."""
    from workbench.analysis.compare import SUMMARY_METRICS, SUMMARY_TITLES
    from workbench.analysis.intervals import mean_interval

    at = page("depth", results)
    assert at.text_input(key="depth_zoo").value == read_manifest(results)["depth_zoo"]
    assert at.selectbox[0].value == "resid_var" and len(at.get("plotly_chart")) == 2
    curves, bars = (json.loads(c) for c in charts(at))
    assert sorted(t["legendgroup"] for t in curves["data"] if t.get("fill") == "toself") == ["post-ln", "pre-ln"]
    assert "mean of 3" in " ".join(t.get("name", "") for t in curves["data"])
    bar, points = bars["data"]
    seeds = [float(v) for v in _plotly_array(points["y"])[:3]]  # pre-ln's three seeds
    ref = mean_interval(seeds)
    assert abs(float(_plotly_array(bar["y"])[0]) - ref["mean"]) < 1e-9
    assert abs(float(_plotly_array(bar["error_y"]["array"])[0]) - (ref["hi"] - ref["mean"])) < 1e-9
    cell = at.dataframe[0].value.set_index(["Model", "Metric"]).loc[("pre-ln", SUMMARY_TITLES["val_ce"])]
    assert cell["Mean [95% interval]"] == f"{ref['mean']:.3f} [{ref['lo']:.3f}, {ref['hi']:.3f}]"
    paired = at.dataframe[1].value
    assert set(paired.Model) == {"post-ln"} and set(paired.Against) == {"pre-ln"} and (paired.Seeds == 3).all()
    assert list(paired.Metric) == [SUMMARY_TITLES[k] for k in SUMMARY_METRICS]
    before = charts(at)
    at.selectbox[0].set_value("grad_norm").run()
    assert not at.exception and charts(at) != before and "gradient norm" in charts(at)[0]
    at.text_input(key="depth_zoo").set_value(str(Path(read_manifest(results)["zoo"]))).run()  # one seed, no bands
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert not [t for t in json.loads(charts(at)[0])["data"] if t.get("fill") == "toself"]


def test_removal_page(results):
    at = page("removal", results)
    labels = [mm.label for mm in at.metric]
    assert "CE LN-free" in labels and "CE control" in labels
    assert any("NMAE" in lbl for lbl in labels)
    nmae = {mm.label: float(mm.value) for mm in at.metric if "NMAE" in mm.label}
    assert nmae["LN-free: NMAE (DLA vs direct effect)"] < 1e-4  # exact once the norms are gone


def test_attribution_page(results):
    at = page("attribution", results)
    assert [s.label for s in at.selectbox] == ["Model"] and len(at.get("plotly_chart")) == 2
    before = charts(at)
    at.selectbox[0].set_value("none").run()
    assert not at.exception and charts(at) != before
    assert float(next(mm for mm in at.metric if "NMAE" in mm.label).value) < 1e-4  # no norm: DLA is exact
    at.selectbox[0].set_value("post-ln").run()
    assert not at.exception and at.warning and "post-ln" in at.warning[0].value.lower()


def test_languages_page(results):
    at = page("languages", results)
    assert at.selectbox[0].value == "pre-ln" and len(at.get("plotly_chart")) == 2
    before = charts(at)
    at.selectbox[0].set_value("pre-ln LN-free").run()
    assert not at.exception and charts(at) != before


def _plotly_array(v) -> np.ndarray:
    """Plotly writes numeric arrays as {dtype, bdata (base64), shape}."""
    if isinstance(v, dict):
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return a.reshape([int(n) for n in str(v.get("shape", len(a))).split(",")])
    return np.asarray(v, dtype=float)


def _ranker_figures(at) -> tuple[np.ndarray, np.ndarray, str]:
    """Heat map z, the scatter's marker y values (sorted, all script groups) and the scatter's title."""
    heat, scatter = (json.loads(s) for s in charts(at))
    ys = np.concatenate([_plotly_array(t["y"]) for t in scatter["data"] if t["mode"] == "markers"])
    return _plotly_array(heat["data"][0]["z"]), np.sort(ys), scatter["layout"]["title"]["text"]


def _rho(v) -> str:
    return f"{v:.2f}".replace("-", "−").replace("−0.00", "0.00")


def test_languages_page_metric_selector(results, tmp_path):
    """The ranker's own result (cosine and retrieval): choosing retrieval puts every language's retrieval score
    on the scatter, its per-layer retrieval in the heat map, and the retrieval Spearman with its interval in the
    title; a result written before retrieval existed (cosine fields only) gets no selector and the cosine figures."""
    r = json.loads(Path(read_manifest(results)["languages"]["pre-ln"]).read_text())
    langs = sorted(r["languages"], key=lambda lang: lang["rank"])
    at = page("languages", results)
    assert [w.label for w in at.radio] == ["Metric"] and at.radio[0].value == "score"
    z, ys, title = _ranker_figures(at)
    np.testing.assert_allclose(ys, sorted(lang["score"] for lang in langs), rtol=1e-12)
    np.testing.assert_allclose(z, [lang["per_layer"] for lang in langs], rtol=1e-12)
    lo, hi = r["spearman_score_vs_bits_per_english_byte_ci95"]
    assert title.endswith(f"ρ = {_rho(r['spearman_score_vs_bits_per_english_byte'])} [{_rho(lo)}, {_rho(hi)}]")

    at.radio[0].set_value("retrieval").run()
    assert not at.exception
    z, ys, title = _ranker_figures(at)
    assert sorted(lang["retrieval"] for lang in langs) != sorted(lang["score"] for lang in langs)
    np.testing.assert_allclose(ys, sorted(lang["retrieval"] for lang in langs), rtol=1e-12)
    np.testing.assert_allclose(z, [lang["retrieval_per_layer"] for lang in langs], rtol=1e-12)
    lo, hi = r["spearman_retrieval_vs_bits_per_english_byte_ci95"]
    rho = r["spearman_retrieval_vs_bits_per_english_byte"]
    assert title.startswith("retrieval") and title.endswith(f"ρ = {_rho(rho)} [{_rho(lo)}, {_rho(hi)}]")
    partial = r["partial_spearman_retrieval_vs_bits_per_english_byte_given_token_ratio"]
    assert any("given the token ratio" in c.value and c.value.endswith(_rho(partial)) for c in at.caption)

    old_top = {"model", "corpus", "pooling", "unit", "pairing", "center", "n_layers", "units", "max_tokens",
               "score_definition", "english", "spearman_score_vs_bits_per_english_byte", "seconds", "tokens"}
    old_lang = {"code", "name", "script", "family", "share", "score", "score_ci95", "per_layer", "bits_per_byte",
                "bits_per_english_byte", "n_units", "n_truncated", "tokens", "rank"}
    old = {k: v for k, v in r.items() if k in old_top} | {
        "languages": [{k: v for k, v in lang.items() if k in old_lang} for lang in r["languages"]]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    next(t for t in at.text_input if t.label.startswith("Or a rank-languages")).set_value(
        str(tmp_path / "old.json")).run()
    at.selectbox[0].set_value("old").run()
    assert not at.exception and not at.radio
    z, ys, title = _ranker_figures(at)
    np.testing.assert_allclose(ys, sorted(lang["score"] for lang in langs), rtol=1e-12)
    np.testing.assert_allclose(z, [lang["per_layer"] for lang in langs], rtol=1e-12)
    assert title.endswith(f"ρ = {_rho(r['spearman_score_vs_bits_per_english_byte'])} [n/a]")
    assert not any("given the token ratio" in c.value for c in at.caption)


def _specs(llama_dir) -> list[str]:
    from workbench.loader import smollm2_cached

    return [str(llama_dir), "no-such-model"] + (["smollm2"] if smollm2_cached() else [])


def test_pages_take_any_model_spec(results, llama_dir):
    """A Hugging Face directory (and SmolLM2 when cached) typed into the Attribution, Depth and
    LayerNorm-removal pages: the page works or says in one line why not; never an exception."""
    for spec in _specs(llama_dir):
        at = page("attribution", results)
        at.text_input(key="attribution_spec").set_value(spec).run()
        at.selectbox[0].set_value(spec).run()
        assert not at.exception, (spec, at.exception)
        if spec == "no-such-model":
            assert at.error and "unknown model spec" in at.error[0].value and "\n" not in at.error[0].value
        else:
            nmae = float(next(mm for mm in at.metric if "NMAE" in mm.label).value)
            assert 0 < nmae < 1 and len(at.get("plotly_chart")) == 2  # a live RMSNorm: DLA approximate

        at = page("depth", results)
        at.text_input(key="depth_spec").set_value(spec).run()
        at.number_input[0].set_value(128).run()
        assert not at.exception, (spec, at.exception)
        if spec == "no-such-model":
            assert at.error and "unknown model spec" in at.error[0].value
        else:
            names = [t["name"] for t in json.loads(charts(at)[0])["data"]]
            assert spec in at.multiselect[0].value and spec in names

        at = page("removal", results)
        at.text_input(key="removal_dir").set_value(spec).run()
        at.selectbox[0].set_value(Path(spec).name).run()
        assert not at.exception, (spec, at.exception)
        assert at.error and "not a finished `workbench remove-ln` directory" in at.error[0].value


def test_pages_name_the_command_when_results_are_missing(tmp_path, monkeypatch):
    """No zoo and no results: every page says to train the zoo, which is what the others start from."""
    monkeypatch.chdir(tmp_path)  # no zoo/tiny here either
    for name in ("zoo", "depth", "removal", "attribution", "norms", "languages"):
        at = page(name, tmp_path)
        assert at.info and "workbench zoo --preset tiny" in at.info[0].value, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (exe and driver):
        if os.environ.get("WORKBENCH_REQUIRE_BROWSER"):
            pytest.fail("Chromium and chromedriver are required here (apt install chromium chromium-driver)")
        pytest.skip("Chromium/chromedriver not installed (CI installs them: apt install chromium chromium-driver)")
    return exe, driver


def test_every_page_in_headless_chromium(results, tmp_path, llama_dir, gemma2_dir):
    """Every page, plus Attribution, Depth and Norms opened on a Hugging Face Llama directory (?model=DIR),
    and Norms on a tiny Gemma 2 directory (its sandwich post-norms and soft-capped lens)."""
    from dashboard.browser import screenshot_pages

    exe, driver = _chromium()
    shots = screenshot_pages(results, ARTIFACTS, PAGES, exe, driver, port=_free_port(), profile=tmp_path / "profile",
                             model=str(llama_dir), visits=[("norms?gemma2", "norms", str(gemma2_dir))])
    assert set(shots) == set(PAGES) | {"attribution?model", "depth?model", "norms?model", "norms?gemma2"}
    for name in shots:
        assert shots[name]["errors"] == [], (name, shots[name]["errors"])
        assert shots[name]["title_found"], name
        assert not shots[name]["offers"], name  # the demo computed everything
        assert (ARTIFACTS / f"{name.replace('?', '-')}.png").stat().st_size > 10_000


def test_model_query_parameter_opens_the_page_on_that_model(results, llama_dir):
    os.environ["WORKBENCH_RESULTS"] = str(results)
    at = AppTest.from_file(str(ROOT / "dashboard" / "attribution.py"), default_timeout=120)
    at.query_params["model"] = str(llama_dir)
    at.run()
    assert not at.exception and at.selectbox[0].value == str(llama_dir)
    assert any("NMAE" in mm.label for mm in at.metric)


def test_demo_bad_input(tmp_path, capsys):
    from workbench.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["demo", "--results", str(tmp_path / "file"), "--zoo", str(tmp_path / "zoo")]) == 2
    assert main(["demo", "--preset", "huge", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "unknown preset" in err
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "r").exists()
