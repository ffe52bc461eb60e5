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
    from workbench.data import load_token_data
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
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the process finished before it could be killed"
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_at_kill < steps
    run_train(killed, tiny_corpus, steps=steps)
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
    for groups in (param_groups(m, 0.1), _optimizer(m, RemovalConfig(), 1e-3).param_groups):
        decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        kept = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert "blocks.0.attn.W_Q" in decayed and "embed.W_E" in decayed and "unembed.W_U" in decayed
        assert {"blocks.0.attn.b_Q", "blocks.0.ln1.affine.w", "unembed.b_U"} <= kept
        assert all(n.split(".")[-1].startswith("W_") for n in decayed)
