"""The shipped notebook and analysis script run top to bottom on a tiny model."""

import json
import os
import subprocess
import sys

import workbench
from conftest import ROOT, TINY_MODEL, TINY_TRAIN


def run_notebook(name: str, tmp_path, tiny_corpus, monkeypatch, **env: str) -> dict:
    """Execute a shipped notebook's code cells in order, on a tiny pre-ln run; return their namespace."""
    run = tmp_path / "run"
    workbench.train("pre-ln", run, steps=4, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_RUN", str(run))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"], "notebooks are committed with outputs stripped"
            exec(compile("".join(cell["source"]), "notebook", "exec"), scope)
    return scope


def test_notebook_runs_top_to_bottom(tmp_path, tiny_corpus, monkeypatch):
    scope = run_notebook("01_first_look.ipynb", tmp_path, tiny_corpus, monkeypatch)
    assert scope["model"].cfg.norm == "pre-ln" and len(scope["rms"]) == TINY_MODEL["n_layers"] + 1


def test_zoo_report_script(tmp_path, tiny_corpus):
    from workbench.zoo import train_zoo

    train_zoo(tmp_path, norms="pre-ln,none", steps=3, corpus=str(tiny_corpus), progress=False, log=lambda *_: None,
              model_overrides=TINY_MODEL, train_overrides=dict(batch_size=4, eval_every=3, eval_batches=1))
    r = subprocess.run([sys.executable, str(ROOT / "analyses" / "zoo_report.py"), str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["rank", "norm"] and {l.split()[1] for l in lines[1:]} == {"pre-ln", "none"}
    r = subprocess.run([sys.executable, str(ROOT / "analyses" / "zoo_report.py"), str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert r.returncode == 2


def test_ln_removal_notebook_runs_top_to_bottom(tmp_path, tiny_corpus, monkeypatch):
    scope = run_notebook("02_ln_removal.ipynb", tmp_path, tiny_corpus, monkeypatch,
                         WORKBENCH_NOTEBOOK_CORPUS=str(tiny_corpus), WORKBENCH_NOTEBOOK_STEPS_PER_LN="1")
    assert abs(scope["after"].dla_sum - scope["after"].logit) <= 1e-4 and scope["after"].nmae <= 1e-5
    assert scope["max_diff"] <= 1e-4 and len(scope["schedule"]) == 3 * TINY_MODEL["n_layers"] + 2
