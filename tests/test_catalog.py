"""workbench.catalog (what a zoo and a results directory hold), workbench.live (what a page may compute on
request, and the command that computes the same), and the readable tables and figures the pages show."""

import json
from pathlib import Path

import pytest

from workbench import io
from workbench.catalog import discover
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.live import CHEAP_SECONDS, estimate, model_size, plan
from workbench.presets import PRESETS


def fake_run(d: Path, preset: str = "tiny", norm: str = "pre-ln") -> Path:
    """A run directory as far as discovery and estimates read it: config and summary, no weights."""
    d.mkdir(parents=True)
    io.atomic_write_json(d / io.CONFIG_FILE, {"model": ModelConfig(**PRESETS[preset].model, norm=norm).to_dict()})
    io.atomic_write_json(d / io.SUMMARY_FILE, {"norm": norm, "seed": 0})
    return d


@pytest.fixture
def two_zoos(tmp_path):
    """zoo/tiny (pre-ln, none) that a demo manifest names, and another zoo with its own pre-ln."""
    tiny, other = tmp_path / "zoo" / "tiny", tmp_path / "other"
    for norm in ("pre-ln", "none"):
        fake_run(tiny / norm, norm=norm)
    fake_run(other / "pre-ln")
    results = tmp_path / "results"
    (results / "languages").mkdir(parents=True)
    (results / "languages" / "pre-ln.json").write_text("{}")
    ln_free = results / "ln_free" / "pre-ln"
    ln_free.mkdir(parents=True)
    (ln_free / "summary.json").write_text("{}")
    io.atomic_write_json(results / "manifest.json", {
        "zoo": str(tiny), "models": {"pre-ln": str(tiny / "pre-ln"), "pre-ln LN-free": str(ln_free)},
        "languages": {"pre-ln": str(results / "languages" / "pre-ln.json")}, "removal": {"pre-ln": str(ln_free)}})
    return tiny, other, results


def test_discover_joins_the_zoo_and_the_manifest_without_mixing_models(two_zoos):
    tiny, other, results = two_zoos
    cat = discover(results)
    assert cat.zoo == tiny and cat.zoo_labels() == ["pre-ln", "none"]
    assert list(cat.models) == ["pre-ln", "none", "pre-ln LN-free"]
    assert cat.result("languages", "pre-ln") == results / "languages" / "pre-ln.json"
    assert cat.result("removal", "pre-ln") == results / "ln_free" / "pre-ln"
    # Another zoo: its pre-ln is not the demo's, so the demo's results are not its results.
    cat = discover(results, other)
    assert cat.models["pre-ln"] == str(other / "pre-ln") and cat.models["pre-ln (tiny)"] == str(tiny / "pre-ln")
    assert cat.result("languages", "pre-ln") is None and cat.result("languages", "pre-ln (tiny)") is not None
    # What a page computes for it is named by its zoo: no file shared with the demo's pre-ln.
    assert cat.path_for("diagnose", "pre-ln") == results / "diagnostics" / "other-pre-ln.json"
    cat.path_for("diagnose", "pre-ln").parent.mkdir()
    cat.path_for("diagnose", "pre-ln").write_text("{}")
    assert discover(results, other).result("diagnose", "pre-ln") == results / "diagnostics" / "other-pre-ln.json"
    assert discover(results, tiny).result("diagnose", "pre-ln") is None


def test_a_bad_manifest_is_a_problem_not_an_exception(two_zoos):
    tiny, _, results = two_zoos
    (results / "manifest.json").write_text("{oops")
    cat = discover(results, tiny)
    assert cat.zoo_labels() == ["pre-ln", "none"] and len(cat.problems) == 1 and "not valid JSON" in cat.problems[0]


def test_model_size_matches_the_model_it_describes(tmp_path):
    """The estimate's parameter count against the real model's (learned positions and norms aside)."""
    from workbench.model import GPT

    for preset in ("tiny", "small"):
        run = fake_run(tmp_path / preset, preset)
        cfg = ModelConfig.from_dict(json.loads((run / io.CONFIG_FILE).read_text())["model"])
        real = sum(p.numel() for p in GPT(cfg).parameters())
        assert abs(model_size(str(run))["n_params"] - real) / real < 0.03, preset


def test_what_is_cheap(tmp_path):
    """Tiny and small members: diagnose and a ranking on the page; a tiny removal too; a small removal
    and SmolLM2's diagnostics get their command instead."""
    tiny, small = str(fake_run(tmp_path / "tiny")), str(fake_run(tmp_path / "small", "small"))
    for kind in ("diagnose", "languages"):
        assert estimate(kind, tiny) < estimate(kind, small) <= CHEAP_SECONDS, kind
    assert estimate("removal", tiny) <= CHEAP_SECONDS < estimate("removal", small)
    assert estimate("diagnose", "smollm2") > CHEAP_SECONDS and estimate("removal", "hf:someone/x") is None


def test_plan_refuses_a_removal_remove_ln_refuses(tmp_path):
    fake_run(tmp_path / "zoo" / "post-ln", norm="post-ln")
    fake_run(tmp_path / "zoo" / "pre-ln")
    cat = discover(tmp_path / "results", tmp_path / "zoo")
    with pytest.raises(WorkbenchError, match="Pre-norm"):
        plan(cat, "removal", "post-ln")
    job = plan(cat, "removal", "pre-ln")
    assert job.command == f"workbench remove-ln {tmp_path}/zoo/pre-ln --steps-per-ln 2 --out {job.out}"
    assert job.out == tmp_path / "results" / "ln_free" / "zoo-pre-ln"


def test_intervals_and_numbers_read_as_written():
    from workbench.analysis.display import interval, number

    assert interval(4.4512, 4.4401, 4.4623) == "4.451 [4.440, 4.462]"
    assert interval(4.4512, None, None) == "4.451" and interval(None) == ""
    assert number(0.000123) == "0.000123" and number(12345.6) == "12,346" and number(float("nan")) == ""


def test_loss_figure_tells_fifteen_norms_apart_with_a_full_legend():
    from workbench.zoo import loss_figure

    rows = [{"norm": f"n{i}", "seed": 0, "step": s, "split": split, "loss": 5.0 - i / 10 + s / 100}
            for i in range(15) for s in (10, 20) for split in ("train", "validation")]
    fig = loss_figure(rows, ("validation",))
    colors = [t.line.color for t in fig.data]
    assert len(fig.data) == 15 and len(set(colors)) == 15 and all(t.line.dash == "solid" for t in fig.data)
    both = loss_figure(rows)
    assert len(both.data) == 30 and sum(t.showlegend for t in both.data) == 15
    assert both.layout.height >= 140 + 24 * 15  # every legend line fits: nothing scrolls out of sight
