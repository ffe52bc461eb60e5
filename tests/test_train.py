"""Trainer: bitwise reproducibility, resume-after-kill, divergence capture, DDP = single process."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import workbench
from conftest import ROOT, TINY_MODEL, TINY_TRAIN
from workbench import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(out, corpus, norm="pre-ln", steps=12, **train_extra):
    return workbench.train(norm, out, steps=steps, corpus=str(corpus), model_overrides=TINY_MODEL,
                           train_overrides={**TINY_TRAIN, **train_extra}, progress=False)


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fixed_seed_is_bitwise_reproducible(tmp_path, tiny_corpus):
    s1 = run_train(tmp_path / "a", tiny_corpus)
    s2 = run_train(tmp_path / "b", tiny_corpus)
    assert_bitwise_equal(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert s1["final_val_loss"] == s2["final_val_loss"]
    s3 = workbench.train("pre-ln", tmp_path / "c", steps=12, seed=1, corpus=str(tiny_corpus),
                         model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN, progress=False)
    assert s3["final_val_loss"] != s1["final_val_loss"], "a different seed must give a different run"


def test_run_directory_contents_and_load(tmp_path, tiny_corpus):
    s = run_train(tmp_path / "r", tiny_corpus)
    run = tmp_path / "r"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    assert {"norm", "final_val_loss", "steps", "tokens", "seconds", "diverged"} <= summary.keys()
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 31 and not summary["diverged"]
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["val_loss"] == s["final_val_loss"]
    m = workbench.load(run)
    t = m.to_tokens("It is a truth universally acknowledged")
    assert t[0, 0].item() == 0  # BOS
    assert m.to_string(t[0, 1:]) == "It is a truth universally acknowledged"
    loss = m(t, return_type="loss")
    assert torch.isfinite(loss)
    # The loaded model reproduces the trainer's final validation loss exactly.
    from workbench.batches import load_token_data
    from workbench.train import evaluate
    data = load_token_data(str(tiny_corpus), TINY_MODEL["d_vocab"])
    batches = data.val_batches(TINY_TRAIN["eval_batches"], TINY_TRAIN["batch_size"], TINY_MODEL["n_ctx"])
    assert evaluate(m, batches, torch.device("cpu")) == pytest.approx(s["final_val_loss"], rel=1e-6)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_corpus):
    """SIGKILL a training process after a checkpoint; resuming ends with identical weights."""
    steps = 40
    ref = tmp_path / "ref"
    run_train(ref, tiny_corpus, steps=steps)
    killed = tmp_path / "killed"
    code = (
        "import sys, workbench; sys.path.insert(0, %r); from conftest import TINY_MODEL, TINY_TRAIN;"
        "workbench.train('pre-ln', %r, steps=%d, corpus=%r, model_overrides=TINY_MODEL,"
        " train_overrides={**TINY_TRAIN, 'ckpt_every': 4}, progress=False)"
    ) % (str(ROOT / "tests"), str(killed), steps, str(tiny_corpus))
    # Same thread count as this process: bitwise equality holds for a fixed machine and thread count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    ckpt = killed / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and checkpoint.load(ckpt)["step"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the process finished before it could be killed"
    step_at_kill = checkpoint.load(ckpt)["step"]
    assert 0 < step_at_kill < steps
    done = []
    s = workbench.train("pre-ln", killed, steps=steps, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False, on_step=lambda k, _: done.append(k))
    # A resume, not a restart (which would reproduce the same weights bitwise): only the missing steps ran.
    assert done == list(range(step_at_kill + 1, steps + 1)) and s["resumed_from_step"] == step_at_kill
    assert_bitwise_equal(weights(ref), weights(killed))
    a = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]


def test_divergence_is_caught_at_the_step_and_last_good_checkpoint_kept(tmp_path, tiny_corpus):
    """A huge learning rate on the norm-free model blows up; the run stops and says where."""
    run = tmp_path / "div"
    s = run_train(run, tiny_corpus, norm="none", steps=30, lr=1e30, warmup_steps=1, ckpt_every=1)
    assert s["diverged"] is True
    assert s["final_val_loss"] is None
    at = s["diverged_at_step"]
    assert 1 < at <= 30
    assert s["weights_from_step"] == at - 1 == s["steps"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_at_step"] == at
    m = workbench.load(run)  # the last good weights are loadable and finite
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_divergence_from_cli_names_step_and_norm(tmp_path, tiny_corpus):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--norm", "none", "--steps", "20",
                        "--lr", "1e30", "--n-ctx", "32", "--corpus", str(tiny_corpus), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 3, r.stderr
    assert "none diverged at step" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "summary.json").read_text())["diverged"] is True


def test_two_process_gloo_ddp_matches_single_process(tmp_path, tiny_corpus):
    """torchrun --nproc_per_node=2 with the same global batch follows the 1-process loss trajectory."""
    single = tmp_path / "single"
    run_train(single, tiny_corpus, steps=8)
    ddp = tmp_path / "ddp"
    code = (
        "import sys, workbench; sys.path.insert(0, %r); from conftest import TINY_MODEL, TINY_TRAIN;"
        "workbench.train('pre-ln', %r, steps=8, corpus=%r, model_overrides=TINY_MODEL,"
        " train_overrides=TINY_TRAIN, progress=False)"
    ) % (str(ROOT / "tests"), str(ddp), str(tiny_corpus))
    script = tmp_path / "ddp_train.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        str(script)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = [json.loads(l) for l in (single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5, abs=1e-5)
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    wa, wb = weights(single), weights(ddp)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)


def test_learning_rate_is_linear_warmup_then_cosine_to_min():
    from workbench.train import TrainConfig

    c = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(1e-4) and c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert c.lr_at(100) == pytest.approx(1e-4)
    assert all(c.lr_at(s) >= c.lr_at(s + 1) for s in range(10, 100))


def test_one_weight_decay_rule_for_training_and_fine_tuning():
    """Matrices (W_*) decay; biases — attention's [heads, d_head] ones included — and norm gains do not,
    in the trainer and in the removal fine-tune alike."""
    from workbench.config import ModelConfig
    from workbench.model import GPT
    from workbench.optim import param_groups
    from workbench.removal.finetune import RemovalConfig, _optimizer

    m = GPT(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=64, n_ctx=8))
    names = {id(p): n for n, p in m.named_parameters()}
    for groups in (param_groups(m, 0.1), _optimizer(m, RemovalConfig.of(), 1e-3).param_groups):
        decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        kept = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert "blocks.0.attn.W_Q" in decayed and "embed.W_E" in decayed and "unembed.W_U" in decayed
        assert {"blocks.0.attn.b_Q", "blocks.0.ln1.affine.w", "unembed.b_U"} <= kept
        assert all(n.split(".")[-1].startswith("W_") for n in decayed)


class _Stop(KeyboardInterrupt):
    """Interrupts a run from its step callback, like Ctrl-C: the trainer keeps what it checkpointed."""


def _interrupted_run(out, corpus, steps, stop_after):
    def on_step(k, _):
        if k > stop_after:
            raise _Stop
    with pytest.raises(_Stop):
        workbench.train("pre-ln", out, steps=steps, corpus=str(corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False, on_step=on_step)
    assert checkpoint.load(out / "checkpoint.safetensors")["step"] == stop_after


def test_resume_reads_the_checkpoint_a_damaged_one_changes_the_result(tmp_path, tiny_corpus):
    """If resuming ignored the checkpoint and restarted, the weights would still match the reference;
    a checkpoint whose weights were changed (but which still loads) must change the final weights."""
    ref = tmp_path / "ref"
    run_train(ref, tiny_corpus, steps=12)
    run = tmp_path / "run"
    _interrupted_run(run, tiny_corpus, 12, stop_after=8)
    state = checkpoint.load(run / "checkpoint.safetensors")
    state["model"]["blocks.0.attn.W_Q"] = state["model"]["blocks.0.attn.W_Q"] * 1.5
    checkpoint.save(run / "checkpoint.safetensors", state)
    s = run_train(run, tiny_corpus, steps=12)
    assert s["resumed_from_step"] == 8
    a, b = weights(ref), weights(run)
    assert not torch.equal(a["blocks.0.attn.W_Q"], b["blocks.0.attn.W_Q"])
    assert s["final_val_loss"] != json.loads((ref / "summary.json").read_text())["final_val_loss"]


def test_checkpoint_round_trips_a_training_state_exactly(tmp_path):
    """Tensors bit for bit (0-dim, shared storage, bf16), int-keyed dicts, tuples and non-finite floats."""
    w = torch.randn(3, 4)
    state = {"model": {"a": w, "tied": w, "step0": torch.tensor(7.0), "half": torch.randn(5).bfloat16()},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
                           "param_groups": [{"betas": (0.9, 0.95), "lr": 1 / 3, "foreach": None, "params": [0]}]},
             "step": 12, "metrics": [{"loss": float("nan"), "big": float("inf"), "x": 0.1 + 0.2}], "seconds": 1e-300}
    checkpoint.save(tmp_path / "c.safetensors", state)
    back = checkpoint.load(tmp_path / "c.safetensors")
    assert back["step"] == 12 and back["seconds"] == 1e-300
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["optimizer"]["param_groups"][0]["lr"] == 1 / 3 and back["optimizer"]["param_groups"][0]["foreach"] is None
    assert list(back["optimizer"]["state"]) == [0] and torch.equal(back["optimizer"]["state"][0]["exp_avg"],
                                                                    state["optimizer"]["state"][0]["exp_avg"])
    m = back["metrics"][0]
    assert math.isnan(m["loss"]) and m["big"] == float("inf") and m["x"] == 0.1 + 0.2
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    with pytest.raises(TypeError, match="only tensors"):
        checkpoint.save(tmp_path / "d.safetensors", {"f": print})
    assert not (tmp_path / "d.safetensors").exists() and not list(tmp_path.glob(".*tmp"))


class _RunsCode:
    """Unpickling this calls Path.touch on a marker file: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_checkpoint_never_runs_code(tmp_path, tiny_corpus, capsys):
    """A run directory whose checkpoint.pt would run code when unpickled: refused in one line without
    --trust-pickle, and with it torch's weights-only unpickler refuses the callable. Nothing runs."""
    from workbench.cli import main

    run = tmp_path / "run"
    argv = ["train", "--norm", "pre-ln", "--steps", "8", "--n-ctx", "32", "--corpus", str(tiny_corpus),
            "--out", str(run), "--quiet"]
    assert main(argv) == 0
    (run / "summary.json").unlink()
    (run / "checkpoint.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker), "optimizer": {}, "step": 1}, run / "checkpoint.pt")
    capsys.readouterr()
    for extra, says in (([], "--trust-pickle"), (["--trust-pickle"], "not a plain-tensor checkpoint")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("workbench: error:") and says in err, err
        assert not marker.exists(), "the pickle ran code"
        assert not (run / "summary.json").exists() and (run / "checkpoint.pt").exists()


def test_legacy_pickle_checkpoint_resumes_only_when_trusted(tmp_path, tiny_corpus):
    """A workbench 0.1 run directory (pickled checkpoint.pt) resumes with trust_pickle to the weights of
    an uninterrupted run, and from then on holds only the safe format."""
    from workbench.errors import WorkbenchError

    ref = tmp_path / "ref"
    run_train(ref, tiny_corpus, steps=12)
    run = tmp_path / "old"
    _interrupted_run(run, tiny_corpus, 12, stop_after=8)
    torch.save(checkpoint.load(run / "checkpoint.safetensors"), run / "checkpoint.pt")
    (run / "checkpoint.safetensors").unlink()
    with pytest.raises(WorkbenchError, match="trust-pickle"):
        run_train(run, tiny_corpus, steps=12)
    s = workbench.train("pre-ln", run, steps=12, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False, trust_pickle=True)
    assert s["resumed_from_step"] == 8
    assert_bitwise_equal(weights(ref), weights(run))
    assert not (run / "checkpoint.pt").exists() and (run / "checkpoint.safetensors").exists()


def test_nothing_the_trainer_writes_is_a_pickle(tmp_path, tiny_corpus):
    run_train(tmp_path / "r", tiny_corpus, steps=4)
    for f in (tmp_path / "r").iterdir():
        head = f.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{f.name} looks like a pickle / torch.save zip"


def _snapshot(d: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def test_run_directories_that_are_never_written_over(tmp_path, tiny_corpus, capsys):
    """A finished run, an unfinished run with another configuration, and a folder that is not a run:
    each refused in one line with exit 2, not a byte changed."""
    from workbench.cli import main

    def argv(out, *extra):
        return ["train", "--norm", "pre-ln", "--steps", "4", "--n-ctx", "32", "--corpus", str(tiny_corpus),
                "--out", str(out), "--quiet", *extra]

    finished = tmp_path / "finished"
    assert main(argv(finished)) == 0
    unfinished = tmp_path / "unfinished"
    assert main(argv(unfinished)) == 0
    (unfinished / "summary.json").unlink()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    capsys.readouterr()
    for out, extra, says in ((finished, [], "already holds a finished run"),
                             (unfinished, ["--lr", "1e-3"], "different configuration"),
                             (unfinished, ["--seed", "3"], "different configuration"),
                             (foreign, [], "is not a workbench run")):
        before = _snapshot(out)
        assert main(argv(out, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("workbench: error:") and says in err, err
        assert _snapshot(out) == before, out


@pytest.mark.parametrize("lr", ["1e38", "inf", "nan", "0"])
def test_learning_rates_adam_cannot_take_are_one_line(tmp_path, capsys, lr):
    """Above ~1e37 Adam's step size overflows float32 inside torch: refused before anything is written."""
    from workbench.cli import main
    from workbench.errors import WorkbenchError
    from workbench.removal.finetune import RemovalConfig

    assert main(["train", "--norm", "pre-ln", "--lr", lr, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no larger than 1e30" in err, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(WorkbenchError, match="no larger than 1e30"):
        RemovalConfig.of(lr=float(lr))


def test_medium_preset_is_deep_and_trains_a_step():
    from workbench.model import GPT
    from workbench.train import build_configs

    cfg, tc = build_configs("lns", "medium")
    assert cfg.n_layers >= 24 and cfg.d_model >= 256 and tc.steps * tc.batch_size * (cfg.n_ctx - 1) > 8e6
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (1, 64))
    loss = model(tokens, return_type="loss")
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
