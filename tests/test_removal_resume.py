"""remove-ln survives a kill: checkpoints in OUT.partial, resumed by the same command to the same weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal import api

# float32 whatever the CPU (the default is auto): these tests compare exact arithmetic
RC = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, dtype="float32", warmup_steps=1, final_steps=3,
          ema=0.1, bridge="ramp", bridge_steps=2, special_steps=4)


class Killed(BaseException):
    """Stands for SIGKILL: not an error the command handles."""


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("src") / "pre-ln"
    workbench.train("pre-ln", d, steps=8, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    return d


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("ref") / "free"
    s = remove_ln(source, out, RemovalConfig.of(**RC, checkpoint_every=0), corpus=str(tiny_corpus), progress=False)
    assert s["resumed_from_step"] is None
    return out, s


def _kill_at(phase: str, at: int, monkeypatch):
    seen = []

    def on_step(step):
        seen.append(step)
        if step == at:
            raise Killed

    monkeypatch.setitem(api._ON_STEP, phase, on_step)
    return seen


def _same_result(a, b):
    for rel in ("model.safetensors", "control/model.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (rel, k)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


# removal at 9: halfway through the special positions' hand-over; at 5: a norm is calibrated at the resumed
# step while the one before it is still bridging (it must see that bridge as the killed run left it)
@pytest.mark.parametrize("phase,kill_at,resumes_from", [("removal", 11, 9), ("removal", 6, 5), ("control", 7, 5)])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(source, uninterrupted, tmp_path, tiny_corpus, monkeypatch,
                                                           phase, kill_at, resumes_from):
    ref_out, ref = uninterrupted
    out = tmp_path / "free"
    every = resumes_from
    _kill_at(phase, kill_at, monkeypatch)
    with pytest.raises(Killed):
        remove_ln(source, out, RemovalConfig.of(**RC, checkpoint_every=every), corpus=str(tiny_corpus), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".free.tmp-*"))  # a kill leaves no half-written --out
    partial = tmp_path / "free.partial"
    assert (partial / "removal.safetensors").exists()
    monkeypatch.setitem(api._ON_STEP, phase, None)
    ran = _kill_at(phase, -1, monkeypatch)  # records the steps the resumed phase executes
    s = remove_ln(source, out, RemovalConfig.of(**RC, checkpoint_every=every), corpus=str(tiny_corpus), progress=False)
    total = ref["steps"]
    assert ran == list(range(resumes_from + 1, total + 1))  # only the steps after the checkpoint ran again
    if phase == "removal":
        assert s["resumed_from_step"] == resumes_from
    else:  # the removal phase had finished: it was restored, not re-run
        assert s["resumed_from_step"] == total
    _same_result(out, ref_out)
    for k in ("ce_ln_free", "ce_control", "schedule", "fold_max_abs_logit_diff", "ce_before_special_off"):
        assert s[k] == ref[k], k
    assert not partial.exists()  # finished: the checkpoints are gone


def test_distilling_from_the_control_resumes_with_the_finished_control_as_teacher(source, tmp_path, tiny_corpus,
                                                                                monkeypatch):
    """--teacher control trains the control first: killed in the removal arm, the resume loads the finished
    control as the teacher (it does not train it again) and ends at the uninterrupted run's weights."""
    def rc(every):
        return RemovalConfig.of(**RC, objective="kl", teacher="control", checkpoint_every=every)

    remove_ln(source, tmp_path / "ref", rc(0), corpus=str(tiny_corpus), progress=False)
    _kill_at("removal", 6, monkeypatch)
    with pytest.raises(Killed):
        remove_ln(source, tmp_path / "free", rc(5), corpus=str(tiny_corpus), progress=False)
    monkeypatch.setitem(api._ON_STEP, "removal", None)
    control_steps = _kill_at("control", -1, monkeypatch)
    s = remove_ln(source, tmp_path / "free", rc(5), corpus=str(tiny_corpus), progress=False)
    assert control_steps == [] and s["resumed_from_step"] == 5
    _same_result(tmp_path / "free", tmp_path / "ref")


def test_a_checkpoint_of_another_command_is_refused_and_kept(source, tmp_path, tiny_corpus, monkeypatch, capsys):
    out = tmp_path / "free"
    _kill_at("removal", 3, monkeypatch)
    with pytest.raises(Killed):
        remove_ln(source, out, RemovalConfig.of(**RC, checkpoint_every=2), corpus=str(tiny_corpus), progress=False)
    monkeypatch.setitem(api._ON_STEP, "removal", None)
    before = (tmp_path / "free.partial" / "removal.safetensors").read_bytes()
    code = main(["remove-ln", str(source), "--out", str(out), "--steps-per-ln", "2", "--corpus", str(tiny_corpus),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "different configuration" in err and "steps_per_ln" not in err
    assert "config differ" in err
    assert (tmp_path / "free.partial" / "removal.safetensors").read_bytes() == before and not out.exists()
    (tmp_path / "free.partial" / "removal.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WorkbenchError, match="corrupt or not a workbench checkpoint"):
        remove_ln(source, out, RemovalConfig.of(**RC, checkpoint_every=2), corpus=str(tiny_corpus), progress=False)


def test_checkpoints_are_safetensors_with_json_bookkeeping(source, tmp_path, tiny_corpus, monkeypatch):
    from workbench import checkpoint

    _kill_at("removal", 4, monkeypatch)
    with pytest.raises(Killed):
        remove_ln(source, tmp_path / "free", RemovalConfig.of(**RC, checkpoint_every=4), corpus=str(tiny_corpus),
                  progress=False)
    path = tmp_path / "free.partial" / "removal.safetensors"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    state = checkpoint.load(path)
    assert state["step"] == 4 and not state["done"] and state["phase"] == "removal"
    frozen = [e for e in state["schedule"] if "sigma" in e]
    assert [e["norm"] for e in frozen] == ["blocks.0.ln2", "blocks.1.ln2", "blocks.0.ln1", "blocks.1.ln1"]
    # the frozen σ (with its EMA drift) is part of the weights, so a resume does not recalibrate it
    assert "blocks.0.ln2.standardize.sigma" in state["model"]
    assert json.loads(json.dumps(state["fingerprint"])) == state["fingerprint"]


def test_a_diverged_run_leaves_nothing_but_the_trace_asked_for(source, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "free"
    code = main(["remove-ln", str(source), "--out", str(out), "--lr", "1e30", "--steps-per-ln", "2",
                 "--tokens-per-step", "64", "--checkpoint-every", "1", "--corpus", str(tiny_corpus), "--quiet",
                 "--no-control", "--trace", str(tmp_path / "trace.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "diverged" in err and "norms frozen" in err, err
    assert not out.exists() and not (tmp_path / "free.partial").exists()
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["diverged"] in err and trace["metrics"]
    if "calibration batch" in err:  # the overflowing weights already poison the next norm's σ
        assert not math.isfinite(trace["schedule"][-1]["sigma"])
    else:
        assert sum(1 for m in trace["metrics"] if m.get("skipped")) == 6  # max_skipped + 1 in a row, then the stop


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint-every", "-1"], "--checkpoint-every must be ≥ 0"),
    (["--trace", "no/such/dir/t.json"], "give a file in an existing directory"),
])
def test_bad_checkpoint_options(source, tmp_path, capsys, argv, message):
    code = main(["remove-ln", str(source), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())
