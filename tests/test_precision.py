"""bfloat16 training: autocast over float32 master weights, reproducible, resumable, close to float32."""

import json

import pytest
import torch
from safetensors.torch import load_file

import workbench
from conftest import TINY_MODEL, TINY_TRAIN, rel_err, scale_gpt
from workbench import checkpoint, precision
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.model.gpt import lm_cross_entropy


def run(out, corpus, dtype, steps=12, seed=0, **kw):
    return workbench.train("pre-ln", out, steps=steps, seed=seed, corpus=str(corpus), model_overrides=TINY_MODEL,
                           train_overrides={**TINY_TRAIN, **kw}, progress=False, dtype=dtype, device="cpu")


def interrupted(out, corpus, dtype, after, steps=12):
    """A run stopped (like Ctrl-C) once step ``after`` is checkpointed."""
    from test_train import _Stop

    def stop(k, _):
        if k > after:
            raise _Stop
    with pytest.raises(_Stop):
        workbench.train("pre-ln", out, steps=steps, corpus=str(corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False, dtype=dtype, device="cpu", on_step=stop)


def test_auto_is_bfloat16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert precision.resolve_dtype("auto", cpu) == "bfloat16"
    assert "avx512_bf16" in precision.why("auto", cpu)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert precision.resolve_dtype("auto", cpu) == "float32"
    assert precision.resolve_dtype("bfloat16", cpu) == "bfloat16"  # asked for: honoured, only slower


def test_bfloat16_autocast_computes_in_bfloat16():
    """The arithmetic itself, against an explicit bf16 matmul: float16 (more mantissa, less range) would
    give other digits and another dtype."""
    a, b = torch.randn(8, 16) * 3, torch.randn(16, 4) * 3
    with precision.autocast(torch.device("cpu"), "bfloat16"):
        got = a @ b
    assert got.dtype == torch.bfloat16 and torch.equal(got, a.bfloat16() @ b.bfloat16())
    model = scale_gpt(GPT(ModelConfig(norm="pre-ln", **TINY_MODEL)), seed=1)
    seen = {}

    def dtype_of(key):
        return lambda x, hook: seen.update({key: x.dtype})  # returns None: the activation is unchanged

    with precision.autocast(torch.device("cpu"), "bfloat16"), \
            model.hooks(fwd_hooks=[("blocks.0.attn.hook_q", dtype_of("q")), ("blocks.0.hook_mlp_out", dtype_of("mlp"))]):
        model(torch.randint(0, TINY_MODEL["d_vocab"], (2, 8)))
    assert seen == {"q": torch.bfloat16, "mlp": torch.bfloat16}


def test_asking_for_bf16_on_a_cpu_without_it_says_it_is_emulated_once(monkeypatch, tmp_path, tiny_corpus, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    monkeypatch.setattr(precision, "_SAID", set())
    line = precision.emulated("bfloat16", cpu)
    assert "emulated" in line and "avx512_bf16" in line and "2.8×" in line and "--dtype auto" in line
    assert precision.why("bfloat16", cpu) == line
    assert precision.emulated("float32", cpu) is None and precision.emulated("auto", cpu) is None
    run(tmp_path / "a", tiny_corpus, "bfloat16", steps=2)
    run(tmp_path / "b", tiny_corpus, "bfloat16", steps=2)
    err = capsys.readouterr().err.splitlines()
    assert [e for e in err if "emulated" in e] == [f"workbench: warning: {line}"]
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert precision.emulated("bfloat16", cpu) is None and precision.why("bfloat16", cpu) == "bfloat16 (asked for)"


def test_cpu_flags_come_from_proc_cpuinfo():
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    precision.cpu_bf16_flags.cache_clear()
    assert set(precision.cpu_bf16_flags()) == flags & {"avx512_bf16", "amx_bf16"}


def test_bf16_forward_and_backward_track_float32():
    """One step of a far-from-linear model: the bf16 path (explicit attention, bf16 matmuls) gives the
    float32 loss to bf16 precision and gradients pointing the same way; a missing causal mask or a wrong
    softmax in the explicit path would not."""
    torch.manual_seed(0)
    model = scale_gpt(GPT(ModelConfig(norm="pre-ln", **TINY_MODEL)), seed=1)
    tokens = torch.randint(0, TINY_MODEL["d_vocab"], (3, TINY_MODEL["n_ctx"]))
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model.zero_grad()
        with precision.autocast(torch.device("cpu"), dtype):
            logits = model(tokens)
            loss = lm_cross_entropy(logits, tokens)
        loss.backward()
        assert loss.dtype == torch.float32
        grads[dtype] = (loss.item(), logits.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l32, z32, g32), (l16, z16, g16) = grads["float32"], grads["bfloat16"]
    assert not torch.equal(z32, z16), "bf16 autocast did not change the arithmetic"
    # bf16 keeps 8 significant bits (2⁻⁸ ≈ 4e-3 per rounding); through two blocks of weights this large the
    # logits move by 3.4e-2 of their scale. Attention without its causal mask moves them by 1.3.
    assert rel_err(z16, z32) < 6e-2
    assert abs(l16 - l32) / l32 < 1e-2
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    assert cos > 0.99, cos


def test_bf16_loss_is_computed_in_float32():
    logits = torch.randn(2, 5, 7).mul(30).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 5))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].double().reshape(-1, 7), tokens[:, 1:].reshape(-1))
    got = lm_cross_entropy(logits, tokens)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 1e-5


def test_bf16_run_keeps_float32_weights_and_optimizer_and_ends_close_to_float32(tmp_path, tiny_corpus):
    """Tolerance: 0.03 nats of validation loss after 40 steps (the issue's bound for the tiny zoo;
    measured 0.002 on the tiny preset, README)."""
    s32 = run(tmp_path / "f32", tiny_corpus, "float32", steps=40)
    s16 = run(tmp_path / "bf16", tiny_corpus, "bfloat16", steps=40)
    assert s16["dtype"] == "bfloat16" and s32["dtype"] == "float32"
    assert s16["final_val_loss"] != s32["final_val_loss"]
    assert abs(s16["final_val_loss"] - s32["final_val_loss"]) < 0.03
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["train"]["dtype"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values())
    state = checkpoint.load(tmp_path / "bf16" / "checkpoint.safetensors")
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_bf16_is_bitwise_reproducible_and_resumes_exactly(tmp_path, tiny_corpus):
    run(tmp_path / "a", tiny_corpus, "bfloat16")
    run(tmp_path / "b", tiny_corpus, "bfloat16")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    interrupted(tmp_path / "c", tiny_corpus, "bfloat16", after=8)
    s = run(tmp_path / "c", tiny_corpus, "bfloat16")
    assert s["resumed_from_step"] == 8
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_resumes_only_in_its_own_precision(tmp_path, tiny_corpus, capsys):
    interrupted(tmp_path / "r", tiny_corpus, "float32", after=4)
    with pytest.raises(workbench.WorkbenchError, match="different configuration"):
        run(tmp_path / "r", tiny_corpus, "bfloat16")
    # A run written before --dtype existed has no dtype in its config: it trained in float32.
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    del cfg["train"]["dtype"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    assert run(tmp_path / "r", tiny_corpus, "float32")["resumed_from_step"] == 4


@pytest.mark.parametrize("argv, match", [
    (["train", "--norm", "pre-ln", "--dtype", "float16"], "--dtype float16 is not supported"),
    (["train", "--norm", "pre-ln", "--dtype", "int8"], "unknown --dtype 'int8'"),
    (["zoo", "--dtype", "half"], "--dtype half is not supported"),
    (["remove-ln", "MODEL", "--dtype", "float16"], "--dtype float16 is not supported"),
])
def test_bad_dtype_is_one_line_and_writes_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    argv = [str(tmp_path) if a == "MODEL" else a for a in argv] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("workbench: error:") and match in err, err
    assert not out.exists()


def test_remove_ln_in_bf16_fine_tunes_in_bf16_and_still_folds_exactly(tmp_path, tiny_corpus):
    """The removal fine-tune under bf16 autocast: a different trajectory from float32's (the arithmetic
    changed), CE within 0.05 nats of it, float32 weights written, and the fold as exact as ever."""
    from workbench.removal import RemovalConfig, remove_ln

    run(tmp_path / "src", tiny_corpus, "float32", steps=8)
    rc = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1, control=False)
    s = {dt: remove_ln(tmp_path / "src", tmp_path / dt, RemovalConfig.of(**rc, dtype=dt), corpus=str(tiny_corpus),
                       device="cpu", progress=False) for dt in ("float32", "bfloat16")}
    assert s["bfloat16"]["dtype"] == "bfloat16" and s["bfloat16"]["config"]["dtype"] == "bfloat16"
    assert s["bfloat16"]["ce_original"] == s["float32"]["ce_original"]  # evaluation is float32 in both
    assert s["bfloat16"]["ce_ln_free"] != s["float32"]["ce_ln_free"]
    assert abs(s["bfloat16"]["ce_ln_free"] - s["float32"]["ce_ln_free"]) < 0.05
    assert s["bfloat16"]["fold_max_abs_logit_diff"] < 1e-4
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "bfloat16" / "model.safetensors")).values())
    # "auto" is resolved against the device before anything runs, and the summary says what ran
    auto = remove_ln(tmp_path / "src", tmp_path / "auto", RemovalConfig.of(**rc, dtype="auto"), corpus=str(tiny_corpus),
                     device="cpu", progress=False)
    assert auto["dtype"] == precision.resolve_dtype("auto", torch.device("cpu"))
