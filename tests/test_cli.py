"""The CLI: norms listing, bad input gives one line and exit 2 with nothing half-written, zoo output."""

import json
import subprocess
import sys

import pytest

from workbench.cli import main
from workbench.norms import scheme_names


def test_norms_lists_every_registered_scheme(capsys):
    assert main(["norms"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == scheme_names()
    assert all(len(line.split(maxsplit=1)[1]) > 20 for line in out)


def bad(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("workbench: error:") and match in err, err


def test_unknown_norm(tmp_path, capsys):
    bad(["train", "--norm", "layernorm9", "--out", str(tmp_path / "x")], capsys, "unknown norm 'layernorm9'")
    assert not (tmp_path / "x").exists()


def test_empty_corpus_leaves_no_run_directory(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    bad(["train", "--norm", "pre-ln", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x")],
        capsys, "empty")
    assert not (tmp_path / "x").exists()


def test_context_longer_than_corpus_or_model(tmp_path, capsys, tiny_corpus):
    bad(["train", "--norm", "pre-ln", "--corpus", str(tiny_corpus), "--n-ctx", "10000000", "--out",
         str(tmp_path / "x")], capsys, "fewer than one context")
    assert not (tmp_path / "x").exists()


def test_unknown_preset_and_bad_steps(tmp_path, capsys):
    bad(["train", "--norm", "pre-ln", "--preset", "huge", "--out", str(tmp_path / "x")], capsys, "unknown preset")
    bad(["train", "--norm", "pre-ln", "--steps", "-3", "--out", str(tmp_path / "x")], capsys, "--steps must be positive")
    bad(["zoo", "--norms", "pre-ln,nope", "--out", str(tmp_path / "z")], capsys, "unknown norm 'nope'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_argparse_errors_are_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--norm", "pre-ln"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--out" in r.stderr


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_corpus, capsys):
    import workbench
    from conftest import TINY_MODEL, TINY_TRAIN
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="not found"):
        workbench.load(tmp_path / "nowhere")
    run = tmp_path / "r"
    workbench.train("pre-ln", run, steps=4, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    (run / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(WorkbenchError, match="corrupt"):
        workbench.load(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(WorkbenchError, match="missing"):
        workbench.load(run)
    # An unfinished run whose checkpoint is damaged: resuming it is refused with exit 2.
    half = tmp_path / "half"
    argv = ["train", "--norm", "pre-ln", "--steps", "8", "--n-ctx", "32", "--corpus", str(tiny_corpus),
            "--out", str(half), "--quiet"]
    assert main(argv) == 0
    (half / "summary.json").unlink()
    (half / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    bad(argv, capsys, "corrupt")


def test_zoo_writes_per_norm_runs_json_and_figure(tmp_path, tiny_corpus, capsys):
    from workbench.zoo import train_zoo
    from conftest import TINY_MODEL

    out = tmp_path / "zoo"
    results = train_zoo(out, norms="pre-ln,batchnorm", steps=6, corpus=str(tiny_corpus), progress=False,
                        log=lambda *_: None, model_overrides=TINY_MODEL,
                        train_overrides=dict(batch_size=4, eval_every=3, eval_batches=2))
    data = json.loads((out / "zoo.json").read_text())
    assert set(data) == {"pre-ln", "batchnorm"} == set(results)
    for norm, r in data.items():
        assert (out / norm / "model.safetensors").exists()
        assert isinstance(r["diverged"], bool) and r["final_val_loss"] > 0
    html = (out / "loss_curves.html").read_text()
    assert "pre-ln (validation)" in html and "batchnorm (train)" in html
    # Same seed, data and budget: both started from the same first batch.
    first = [json.loads((out / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("pre-ln", "batchnorm")]
    assert first[0]["lr"] == first[1]["lr"]


def test_norm_option_the_norm_does_not_take(tmp_path, capsys):
    bad(["train", "--norm", "pre-ln", "--alpha", "0.5", "--out", str(tmp_path / "x")], capsys,
        "norm 'pre-ln' does not take ['alpha']")
    bad(["train", "--norm", "mix-ln", "--alpha", "1.5", "--out", str(tmp_path / "x")], capsys,
        "alpha must lie in [0, 1]")
    assert not (tmp_path / "x").exists()


def test_run_files_are_readable_like_ordinary_files(tmp_path, tiny_corpus):
    """Atomic writes go through temporary files; the results must not stay private (0600)."""
    import os
    import stat

    import workbench
    from conftest import TINY_MODEL, TINY_TRAIN

    run = tmp_path / "r"
    workbench.train("pre-ln", run, steps=2, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("model.safetensors", "summary.json", "metrics.jsonl", "checkpoint.safetensors", "config.json"):
        assert stat.S_IMODE((run / f).stat().st_mode) == 0o666 & ~mask, f
    assert not list(run.glob(".*.tmp")), "no temporary files left behind"
