"""`stretch_table`: a run's trend stretch by stretch, against medians written out in plain Python, and the
analysis script that prints it (bad input: one line, exit 2)."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workbench.errors import WorkbenchError
from workbench.removal.report import stretch_table


def _metrics() -> pd.DataFrame:
    norms = ["precondition"] * 3 + [f"blocks.{k // 2}.ln{k % 2 + 1}" for k in range(5)] + ["final"] * 7
    loss = [3.1, 3.4, 3.2, 3.9, 4.4, 12.0, 3.8, 3.7, 3.6, math.nan, 3.5, 3.3, 3.45, 3.2, 3.25]
    control = [3.1, 3.35, 3.15, 3.3, 3.2, 3.4, 3.3, 3.25, 3.2, 3.1, 3.15, 3.05, 3.2, 3.0, 3.1]
    kl = [0.3, 0.31, 0.29, 0.5, 0.7, 2.0, 0.6, 0.55, 0.5, math.nan, 0.45, 0.4, 0.42, 0.35, 0.36]
    rows = [{"step": i + 1, "norm": n, "loss": a, "control_loss": c, "kl": k}
            for i, (n, a, c, k) in enumerate(zip(norms, loss, control, kl))]
    return pd.DataFrame(rows[::-1])  # out of order: the table sorts by step


def test_each_stretch_is_the_median_of_its_steps_written_out():
    m = _metrics().sort_values("step")
    t = stretch_table(_metrics(), every=3)
    phases = {"precondition": [0, 1, 2], "removal": [3, 4, 5, 6, 7], "cool-down": list(range(8, 15))}
    want = []
    for phase, idx in phases.items():
        for s in range(0, len(idx), 3):
            rows = m.iloc[idx[s:s + 3]]
            loss, ctl, kl = rows.loss.tolist(), rows.control_loss.tolist(), rows.kl.tolist()
            finite = [i for i, x in enumerate(loss) if not math.isnan(x)]
            want.append((phase, s // 3, int(rows.step.min()), int(rows.step.max()),
                         statistics.median([loss[i] for i in finite]),
                         statistics.median(ctl), statistics.median([loss[i] - ctl[i] for i in finite]),
                         statistics.median([kl[i] for i in finite]),
                         sum(1 for x in loss if math.isnan(x) or x > 10)))
    got = list(t[["phase", "stretch", "first_step", "last_step", "loss", "control_loss", "gap", "kl",
                  "runaway_steps"]].itertuples(index=False, name=None))
    assert len(got) == len(want) == 1 + 2 + 3
    for g, w in zip(got, want):
        assert g[:4] == w[:4] and g[8] == w[8]
        assert g[4:8] == pytest.approx(w[4:8])


def test_a_run_without_a_control_or_a_teacher_has_neither_column():
    t = stretch_table(_metrics().drop(columns=["control_loss", "kl"]), every=4)
    assert "gap" not in t and "kl" not in t and "control_loss" not in t
    assert t.runaway_steps.sum() == 2


def test_bad_input_is_one_line_exit_2(tmp_path):
    with pytest.raises(WorkbenchError, match="at least 1 step"):
        stretch_table(_metrics(), every=0)
    script = Path(__file__).resolve().parents[1] / "analyses" / "cooldown_trend.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "summary.json" in r.stderr
