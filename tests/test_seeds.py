"""Seeds: Student-t intervals against formulas written out, paired differences, per-seed zoo runs."""

import json
import math
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.analysis.compare import band_table, compare_figure, depth_intervals, depth_paired
from workbench.analysis.intervals import mean_interval, paired_difference, t_cdf, t_quantile
from workbench.cli import main
from workbench.zoo import collect_existing, loss_bands, loss_table, run_dirs, run_groups, run_seeds, train_zoo

# t_{0.975, df} from printed tables (Student 1908 / any statistics textbook), to the digits given there.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}


def test_t_quantile_matches_the_printed_table():
    for df, t in T975.items():
        assert abs(t_quantile(0.975, df) - t) < 5e-5, df
    assert abs(t_quantile(0.025, 4) + T975[4]) < 5e-5


@pytest.mark.parametrize("t", [-7.0, -1.3, 0.0, 0.4, 2.5, 40.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert abs(t_cdf(t, 1) - (0.5 + math.atan(t) / math.pi)) < 1e-12  # Cauchy
    assert abs(t_cdf(t, 2) - (0.5 + t / (2 * math.sqrt(2 + t * t)))) < 1e-12


def test_mean_interval_is_the_textbook_formula():
    r = mean_interval([1.0, 2.0, 4.0])
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert r["n"] == 3 and abs(r["mean"] - mean) < 1e-12 and abs(r["sd"] - sd) < 1e-12
    assert abs(r["lo"] - (mean - half)) < 1e-5 and abs(r["hi"] - (mean + half)) < 1e-5
    one = mean_interval([3.0, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 3.0 and one["lo"] is None


def test_paired_difference_pairs_by_seed_and_tests_the_differences():
    a = {0: 5.9, 1: 6.0, 2: 8.1, 7: 100.0}  # seed 7 has no partner: left out
    b = {2: 6.0, 0: 4.0, 1: 4.0}
    d = paired_difference(a, b)
    diffs = [5.9 - 4.0, 6.0 - 4.0, 8.1 - 6.0]  # ≈ 1.9, 2.0, 2.1
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3 and abs(d["mean"] - mean) < 1e-12
    t = mean / (sd / math.sqrt(3))
    assert abs(d["p"] - (1 - t / math.sqrt(2 + t * t))) < 1e-12  # two-sided p for df = 2, closed form
    assert d["excludes_zero"] is True and d["lo"] > 0
    # Unpaired, the same numbers overlap: A's seeds span 5.9…8.1, B's 4.0…6.0.
    assert mean_interval(list(a.values())[:3])["lo"] < mean_interval(list(b.values()))["hi"]
    noisy = paired_difference({0: 1.0, 1: 3.0, 2: 2.0}, {0: 2.0, 1: 1.0, 2: 2.0})  # differences −1, 2, 0
    assert noisy["excludes_zero"] is False and noisy["lo"] < 0 < noisy["hi"]


def _summary(rows):
    return pd.DataFrame(rows, columns=["model", "var_growth"])


def test_depth_intervals_and_paired_differences_follow_the_seed_labels():
    summary = _summary([("a/seed0", 1.0), ("a/seed1", 2.0), ("a/seed2", 4.0),
                        ("b/seed2", 3.0), ("b/seed0", 0.5), ("b/seed1", 1.0)])
    groups = {m: m.split("/")[0] for m in summary.model}
    seeds = {m: int(m[-1]) for m in summary.model}
    iv = depth_intervals(summary, groups, seeds, ["var_growth"]).set_index("model")
    assert abs(iv.loc["a", "mean"] - 7 / 3) < 1e-12 and iv.loc["b", "values"] == [0.5, 1.0, 3.0]
    paired = depth_paired(summary, groups, seeds, ["var_growth"], [("a", "b")]).iloc[0]
    assert paired["n"] == 3 and abs(paired["mean"] - (0.5 + 1.0 + 1.0) / 3) < 1e-12  # a − b by seed: 0.5, 1, 1


def test_bands_are_the_interval_of_each_layer():
    table = pd.DataFrame({"model": ["x/seed0", "x/seed1", "x/seed2"] * 2 + ["y"] * 2,
                          "group": ["x"] * 6 + ["y"] * 2, "layer": [0, 0, 0, 1, 1, 1, 0, 1],
                          "metric": "m", "value": [1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 5.0, 6.0]})
    b = band_table(table).set_index(["group", "layer"])
    ref = mean_interval([1.0, 2.0, 4.0])
    assert abs(b.loc[("x", 0), "lo"] - ref["lo"]) < 1e-12 and b.loc[("x", 1), "hi"] == 3.0
    assert b.loc[("y", 0), "n"] == 1 and pd.isna(b.loc[("y", 0), "lo"])
    fig = compare_figure(table.assign(metric="resid_var_pos1"), "resid_var")
    fills = [t for t in fig.data if t.fill == "toself"]
    assert len(fills) == 1 and fills[0].legendgroup == "x"  # a band for the seeded group only


def test_a_log_axis_band_is_the_interval_of_the_logs_and_stays_positive():
    """Seeds spread 1 … 100 (post-sub's variance growth spans 10–30): the linear interval crosses zero,
    which a log axis draws as a band down to its floor; the log-space one is exp(mean log ± t·s/√n)."""
    import math

    values = [1.0, 10.0, 100.0]
    table = pd.DataFrame({"model": ["x/seed0", "x/seed1", "x/seed2"], "group": "x", "layer": 0,
                          "metric": "resid_var_pos1", "value": values})
    assert band_table(table).loc[0, "lo"] < 0
    b = band_table(table, log=True).loc[0]
    ref = mean_interval([math.log(v) for v in values])
    assert abs(b["mean"] - 10.0) < 1e-9 and abs(b["lo"] - math.exp(ref["lo"])) < 1e-9 and b["lo"] > 0
    fig = compare_figure(table, "resid_var")
    band = next(t for t in fig.data if t.fill == "toself")
    assert min(band.y) > 0 and "geometric mean of 3" in fig.data[-1].name


def zoo(out, corpus, seeds, steps=8, norms="pre-ln,lns"):
    return train_zoo(out, norms=norms, steps=steps, corpus=str(corpus), progress=False, log=lambda *_: None,
                     model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN, seeds=seeds, device="cpu")


def test_zoo_with_seeds_writes_one_real_run_per_seed_and_the_intervals(tmp_path, tiny_corpus):
    out = tmp_path / "zoo"
    results = zoo(out, tiny_corpus, "0,1,2")
    assert list(run_dirs(out)) == [f"{n}/seed{k}" for n in ("pre-ln", "lns") for k in (0, 1, 2)]
    assert run_groups(out)["lns/seed2"] == "lns" and run_seeds(out)["lns/seed2"] == 2
    # seed k of the zoo is exactly `workbench train --seed k`
    ref = workbench.train("lns", tmp_path / "ref", steps=8, seed=2, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                          train_overrides=TINY_TRAIN, progress=False, device="cpu")
    a, b = load_file(str(out / "lns" / "seed2" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads((out / "lns" / f"seed{k}" / "summary.json").read_text())["final_val_loss"] for k in (0, 1, 2)]
    assert losses[2] == ref["final_val_loss"] and len(set(losses)) == 3
    r = results["lns"]
    iv = mean_interval(losses)
    assert r["final_val_loss"] == pytest.approx(iv["mean"], abs=1e-12)
    assert (r["final_val_loss_lo"], r["final_val_loss_hi"]) == pytest.approx((iv["lo"], iv["hi"]), abs=1e-12)
    record = json.loads((out / "zoo.json").read_text())
    assert record["seeds"] == [0, 1, 2] and set(record["members"]) == {"pre-ln", "lns"}
    pre = [json.loads((out / "pre-ln" / f"seed{k}" / "summary.json").read_text())["final_val_loss"] for k in (0, 1, 2)]
    (pair,) = record["paired"]
    assert (pair["a"], pair["b"]) == ("pre-ln", "lns")
    assert pair["mean"] == pytest.approx(sum(p - q for p, q in zip(pre, losses)) / 3, abs=1e-12)
    assert collect_existing(out)["pre-ln"]["seeds"].keys() == {0, 1, 2}
    rows = loss_table(out)
    assert {r["seed"] for r in rows} == {0, 1, 2}
    band = [b for b in loss_bands(rows) if b["norm"] == "lns" and b["split"] == "validation" and b["step"] == 8][0]
    assert band["mean"] == pytest.approx(iv["mean"], abs=1e-12) and band["n"] == 3


def test_per_seed_runs_resume_independently(tmp_path, tiny_corpus):
    from test_train import _Stop

    out = tmp_path / "zoo"

    def stop(k, _):
        if k > 4:
            raise _Stop
    with pytest.raises(_Stop):  # seed 1 was interrupted at step 4; seeds 0 and 2 not started
        workbench.train("pre-ln", out / "pre-ln" / "seed1", steps=8, seed=1, corpus=str(tiny_corpus),
                        model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN, progress=False, device="cpu",
                        on_step=stop)
    zoo(out, tiny_corpus, [0, 1, 2], norms="pre-ln")
    resumed = {k: json.loads((out / "pre-ln" / f"seed{k}" / "summary.json").read_text())["resumed_from_step"]
               for k in (0, 1, 2)}
    assert resumed == {0: 0, 1: 4, 2: 0}
    ref = workbench.train("pre-ln", tmp_path / "ref", steps=8, seed=1, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                          train_overrides=TINY_TRAIN, progress=False, device="cpu")
    a, b = load_file(str(out / "pre-ln" / "seed1" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "pre-ln" / "seed1" / "summary.json").read_text())["final_val_loss"] == ref["final_val_loss"]
    # a finished seed is kept as it is; a new seed is added beside it
    before = {k: os.stat(out / "pre-ln" / f"seed{k}" / "model.safetensors").st_mtime_ns for k in (0, 1, 2)}
    zoo(out, tiny_corpus, [0, 1, 2, 3], norms="pre-ln")
    assert {k: os.stat(out / "pre-ln" / f"seed{k}" / "model.safetensors").st_mtime_ns for k in (0, 1, 2)} == before
    assert (out / "pre-ln" / "seed3" / "summary.json").is_file()


@pytest.mark.parametrize("seeds, match", [
    ("", "--seeds is empty"),
    (",", "--seeds is empty"),
    ("0,1,0", "--seeds lists seed 0 more than once"),
    ("0,x", "--seeds must be comma-separated integers"),
    ("-1", "--seeds must be non-negative"),
])
def test_bad_seed_lists_are_one_line_and_write_nothing(tmp_path, capsys, seeds, match):
    out = tmp_path / "zoo"
    assert main(["zoo", "--seeds", seeds, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("workbench: error:") and match in err, err
    assert not out.exists()


def test_seed_and_single_layouts_are_not_mixed(tmp_path, tiny_corpus):
    out = tmp_path / "zoo"
    zoo(out, tiny_corpus, None, steps=4, norms="pre-ln")
    with pytest.raises(workbench.WorkbenchError, match="holds a single-seed run"):
        zoo(out, tiny_corpus, "0,1", steps=4, norms="pre-ln")
    seeded = tmp_path / "seeded"
    zoo(seeded, tiny_corpus, "0", steps=4, norms="pre-ln")
    with pytest.raises(workbench.WorkbenchError, match="holds per-seed runs"):
        zoo(seeded, tiny_corpus, None, steps=4, norms="pre-ln")
    with pytest.raises(SystemExit) as e:  # argparse: not both
        main(["zoo", "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
