"""The app's entry point: the main page at "/" and the Zoo page from it, without and with a zoo."""

from streamlit.testing.v1 import AppTest

from conftest import ROOT, TINY_MODEL


def test_zoo_page_without_and_with_a_zoo(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("WORKBENCH_ZOO", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.text_input(key="zoo_dir").set_value(str(tmp_path / "missing")).run()
    assert not at.exception
    assert "workbench zoo --preset tiny" in at.info[0].value
    at.switch_page("dashboard/zoo.py").run()
    assert not at.exception and "workbench zoo --preset tiny" in at.info[0].value

    from workbench.zoo import train_zoo
    train_zoo(tmp_path / "zoo", norms="pre-ln,none", steps=3, corpus=str(tiny_corpus), progress=False,
              log=lambda *_: None, model_overrides=TINY_MODEL,
              train_overrides=dict(batch_size=4, eval_every=3, eval_batches=1))
    at.text_input(key="zoo_dir").set_value(str(tmp_path / "zoo")).run()
    assert not at.exception
    assert at.multiselect[0].value == ["pre-ln", "none"]
    assert len(at.get("plotly_chart")) == 1
    at.multiselect[0].set_value(["none"]).run()
    assert not at.exception and len(at.dataframe[0].value) == 1
