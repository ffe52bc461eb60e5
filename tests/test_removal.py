"""LayerNorm removal: frozen-scale norms, the schedule, folding, the CLI, and bad input."""

import json
import math

import pytest
import torch

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.batches import batch_fingerprint, batches_digest, load_token_data
from workbench.errors import WorkbenchError
from workbench.model import GPT
from workbench.norms.frozen import FrozenStandardize, SpecialPositions
from workbench.norms.handover import handover
from workbench.removal import RemovalConfig, is_norm_free, remove_ln
from workbench.removal.api import same_batches
from workbench.removal.calibrate import calibrate
from workbench.removal.finetune import evaluate
from workbench.removal.gpt_sites import GPTRemoval

# float32 whatever the CPU (the default is auto): these tests compare exact arithmetic
RC = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, dtype="float32", warmup_steps=1)


def heavy(norm, **kw):
    torch.manual_seed(0)
    kw = {"n_layers": 4 if norm == "mix-ln" else 3, **kw}
    m = GPT(ModelConfig(norm=norm, d_model=32, n_heads=4, n_ctx=24, d_vocab=64, **kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.split(".")[-1].startswith("W_") else 0.5))
    return m


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("runs")
    for norm in ("pre-ln", "pre-rms", "mix-ln", "post-ln", "none", "batchnorm"):
        overrides = {**TINY_MODEL, "n_layers": 4} if norm == "mix-ln" else TINY_MODEL
        workbench.train(norm, d / norm, steps=8, corpus=str(tiny_corpus), model_overrides=overrides,
                        train_overrides=TINY_TRAIN, progress=False)
    return d


def test_frozen_standardize_is_the_written_out_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8) * 3 + 1
    tokens = torch.tensor([[0, 4, 7, 0, 2], [0, 1, 1, 1, 1]])
    pos = SpecialPositions(eot_id=0)
    pos.update(tokens)
    st = FrozenStandardize(2.0, centers=True, positions=pos, sigma_bos=5.0, sigma_eot=7.0)
    sigma = torch.full((2, 5, 1), 2.0)
    sigma[:, 0] = 5.0
    sigma[0, 3] = 7.0  # an end-of-text token that is not at position 0
    torch.testing.assert_close(st(x, lambda s: s), (x - x.mean(-1, keepdim=True)) / sigma)
    st.special = False
    torch.testing.assert_close(st(x, lambda s: s), (x - x.mean(-1, keepdim=True)) / 2.0)
    rms = FrozenStandardize(2.0, centers=False)
    torch.testing.assert_close(rms(x, lambda s: s), x / 2.0)


def test_calibration_is_the_rms_of_the_live_scale_over_ordinary_positions():
    m = heavy("pre-ln")
    adapter = GPTRemoval(m)
    tokens = torch.randint(1, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    tokens[1, 9] = 0
    _, cache = m.run_with_cache(tokens)
    x = cache["blocks.1.hook_resid_mid"]  # what blocks.1.ln2 reads
    var = x.var(-1, unbiased=False) + m.cfg.eps
    ordinary = torch.ones_like(var, dtype=torch.bool)
    ordinary[:, 0] = False
    ordinary[1, 9] = False
    pos = SpecialPositions(eot_id=0)
    sig = calibrate(adapter, adapter.net.blocks[1].ln2, tokens, pos)
    assert sig["sigma"] == pytest.approx(var[ordinary].mean().sqrt().item(), rel=1e-5)
    assert sig["sigma_bos"] == pytest.approx(var[:, 0].mean().sqrt().item(), rel=1e-5)
    assert sig["sigma_eot"] == pytest.approx(var[1, 9].sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["pre-ln", "lns", "pre-rms", "pre-crms", "srms", "mix-ln"])
def test_fold_of_frozen_norms_is_exact(norm):
    m = heavy(norm)
    adapter = GPTRemoval(m)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (2, 24), generator=g)
    pos = SpecialPositions(eot_id=None)
    for site in adapter.sites:  # frozen one at a time at the scale the live norm had, as in the schedule
        sigma = calibrate(adapter, site.norm, tokens, pos)["sigma"]
        site.norm.standardize = FrozenStandardize(sigma, site.norm.standardize.centers)
    folded = adapter.fold()
    ref = adapter.net(tokens)
    assert (folded(tokens) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    if norm == "mix-ln":
        assert folded.cfg.norm == "mix-ln" and folded.cfg.norm_kwargs["pre_ln_free"]
        assert not is_norm_free(folded)  # its Post-LN block keeps a live LayerNorm
    else:
        assert folded.cfg.norm == "none" and is_norm_free(folded)
        assert not any("ln" in name for name, _ in folded.named_parameters())


def test_remove_ln_end_to_end(runs, tmp_path, tiny_corpus):
    out = tmp_path / "free"
    s = remove_ln(runs / "pre-ln", out, RemovalConfig.of(**RC), corpus=str(tiny_corpus), progress=False)
    L = TINY_MODEL["n_layers"]
    names = [e["norm"] for e in s["schedule"]]
    assert names == ([f"blocks.{i}.ln2" for i in range(L)] + [f"blocks.{i}.ln1" for i in range(L)]
                     + [f"blocks.{i}.ln1_v" for i in range(L)] + ["ln_final", "special positions"])
    assert [e["step"] for e in s["schedule"]] == list(range(len(names)))  # K = 1
    bs = 64 // TINY_MODEL["n_ctx"]
    assert s["final_steps"] == int(0.3 * len(names))  # the default cool-down
    assert s["tokens_used"] == (len(names) + s["final_steps"]) * bs * (TINY_MODEL["n_ctx"] - 1)
    assert s["token_fraction"] == pytest.approx(s["tokens_used"] / s["pretraining_tokens"])
    assert all(s[k] is not None for k in ("ce_original", "ce_control", "ce_ln_free"))
    assert s["fold_max_abs_logit_diff"] < 1e-4

    free = workbench.load(out)
    assert free.cfg.norm == "none" and is_norm_free(free)
    data = load_token_data(str(tiny_corpus), free.cfg.d_vocab, tokenizer=free.tokenizer)
    val = data.val_batches(2, 4, free.cfg.n_ctx)
    assert evaluate(free, val, None, torch.device("cpu")) == pytest.approx(s["ce_ln_free"], abs=1e-5)
    control = workbench.load(out / "control")
    assert evaluate(control, val, None, torch.device("cpu")) == pytest.approx(s["ce_control"], abs=1e-5)
    assert control.cfg.norm == "pre-ln"
    # With no norm left, direct logit attribution is exact.
    r = direct_logit_attribution(free, "And God said", answer=" the")
    assert abs(r.dla_sum - r.logit) <= 1e-4 and r.nmae <= 1e-5
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(names) + s["final_steps"] and all("control_loss" in m for m in metrics)
    # Both arms saw the batches that (seed, step) defines, step for step: ΔCE compares like with like.
    train = load_token_data(str(tiny_corpus), free.cfg.d_vocab, tokenizer=free.tokenizer)
    expected = [batch_fingerprint(train.train_batch(i, bs, free.cfg.n_ctx, RemovalConfig.of().optimization.seed))
                for i in range(len(metrics))]
    assert [m["batch"] for m in metrics] == expected and len(set(expected)) == len(expected)
    assert s["batches"] == {"removal": batches_digest(expected), "control": batches_digest(expected), "same": True,
                            "first_different_step": None}


def test_same_batches_names_the_first_step_the_arms_differ():
    run = {"steps": 3, "batches": "r", "metrics": [{"step": 1, "batch": "a"}, {"step": 2, "batch": "b"},
                                                    {"step": 3, "batch": "c"}]}
    control = {"steps": 3, "batches": "c", "metrics": [{"step": 1, "batch": "a"}, {"step": 2, "batch": "x"},
                                                        {"step": 3, "batch": "c"}]}
    assert same_batches(run, control) == {"removal": "r", "control": "c", "same": False, "first_different_step": 2}
    longer = {**run, "batches": "r", "metrics": run["metrics"] + [{"step": 4, "batch": "d"}]}
    assert same_batches(run, longer)["first_different_step"] == 4
    assert same_batches(run, {**run})["same"] is True


def test_remove_ln_on_rms_and_mix_ln(runs, tmp_path, tiny_corpus):
    s = remove_ln(runs / "pre-rms", tmp_path / "rms", RemovalConfig.of(**RC, control=False), corpus=str(tiny_corpus),
                  progress=False)
    assert s["ce_control"] is None and s["fold_max_abs_logit_diff"] < 1e-4
    assert is_norm_free(workbench.load(tmp_path / "rms"))
    s = remove_ln(runs / "mix-ln", tmp_path / "mix", RemovalConfig.of(**RC, control=False), corpus=str(tiny_corpus),
                  progress=False)
    assert "Post-norm blocks [0] keep their live norm" in s["note"]
    assert [e["norm"] for e in s["schedule"]][:3] == ["blocks.1.ln2", "blocks.2.ln2", "blocks.3.ln2"]
    m = workbench.load(tmp_path / "mix")
    assert m.cfg.norm_kwargs == {"pre_ln_free": True}


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["remove-ln", "{run}/post-ln"], "needs a Pre-norm model"),
    (["remove-ln", "{run}/none"], "already LayerNorm-free"),
    (["remove-ln", "{run}/batchnorm"], "no per-token scale"),
    (["remove-ln", "{run}/pre-ln", "--steps-per-ln", "0"], "at least 1"),
    (["remove-ln", "{run}/missing"], "not found"),
    (["remove-ln", "{run}/pre-ln", "--tokens-per-step", "-5"], "must be positive"),
    (["convert", "{run}/pre-ln", "--to", "pre-xyz"], "unknown conversion target"),
    (["convert", "{run}/post-ln", "--to", "folded"], "needs a Pre-LN model"),
    (["export", "{run}/pre-rms"], "only pre-ln and LN-free"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, _, err = run([a.format(run=runs) for a in argv] + ["--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_out_dir_must_be_new(runs, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    code, _, err = run(["remove-ln", str(runs / "pre-ln"), "--out", str(tmp_path / "full")], capsys)
    assert code == 2 and "not empty" in err
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_lr_is_warmup_then_constant_during_removal_then_cosine_cool_down():
    import math

    rc = RemovalConfig.of(warmup_steps=4, min_lr_ratio=0.1)

    def _lr_at(step, removal_steps, final_steps, rc, peak):
        return rc.schedule.lr_at(step, removal_steps, final_steps, peak)

    assert rc.schedule.cooldown(40) == 12 and RemovalConfig.of(final_steps=0).schedule.cooldown(40) == 0
    assert _lr_at(0, 40, 10, rc, 1.0) == pytest.approx(0.25) and _lr_at(3, 40, 10, rc, 1.0) == 1.0
    assert all(_lr_at(s, 40, 10, rc, 1.0) == 1.0 for s in range(4, 40))
    assert _lr_at(44, 40, 10, rc, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert _lr_at(49, 40, 10, rc, 1.0) == pytest.approx(0.1)


def test_micro_batches_accumulate_to_the_full_batch(runs, tmp_path, tiny_corpus):
    rc = dict(RC, tokens_per_step=128, control=False)
    full = remove_ln(runs / "pre-ln", tmp_path / "full", RemovalConfig.of(**rc), corpus=str(tiny_corpus), progress=False)
    micro = remove_ln(runs / "pre-ln", tmp_path / "micro", RemovalConfig.of(**rc, micro_batch=1), corpus=str(tiny_corpus),
                      progress=False)
    assert full["batch_size"] == micro["batch_size"] == 4
    assert [e["sigma"] for e in micro["schedule"][:-1]] == pytest.approx([e["sigma"] for e in full["schedule"][:-1]], rel=1e-5)
    assert micro["ce_ln_free"] == pytest.approx(full["ce_ln_free"], abs=1e-4)


def test_median_calibration_is_the_median_token_scale():
    m = heavy("pre-ln")
    adapter = GPTRemoval(m)
    tokens = torch.randint(1, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    _, cache = m.run_with_cache(tokens)
    scale = (cache["blocks.1.hook_resid_mid"].var(-1, unbiased=False) + m.cfg.eps).sqrt()[:, 1:]
    sig = calibrate(adapter, adapter.net.blocks[1].ln2, tokens, SpecialPositions(eot_id=0), statistic="median")
    assert sig["sigma"] == pytest.approx(scale.flatten().median().item(), rel=1e-5)
    assert sig["sigma_rms"] == pytest.approx(scale.pow(2).mean().sqrt().item(), rel=1e-5)
    q = calibrate(adapter, adapter.net.blocks[1].ln2, tokens, SpecialPositions(eot_id=0), statistic="q90")
    assert q["sigma"] == pytest.approx(torch.quantile(scale.flatten().double(), 0.9).item(), rel=1e-5)
    with pytest.raises(WorkbenchError, match="qNN"):
        RemovalConfig.of(sigma="q150")


def test_ema_and_aux_loss_follow_their_formulas():
    from workbench.removal.losses import aux_std_loss as _aux_std_loss

    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    pos = SpecialPositions(eot_id=None)
    pos.update(torch.ones(2, 6, dtype=torch.long))
    st = FrozenStandardize(1.0, centers=True, positions=pos, sigma_bos=3.0, ema=0.5).train()
    st(x, lambda s: s)
    xc = x - x.mean(-1, keepdim=True)
    live = xc[:, 1:].pow(2).mean().sqrt().item()  # ordinary positions only
    assert st.sigma.item() == pytest.approx(0.5 * 1.0 + 0.5 * live, rel=1e-5)
    assert st.sigma_bos.item() == 3.0
    # per-token stds 1 and 3 at the two ordinary positions → mean 2 → ((1/2 − 1)² + (3/2 − 1)²) / 2
    y = torch.zeros(1, 3, 4)
    y[0, 1] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    y[0, 2] = torch.tensor([3.0, -3.0, 3.0, -3.0])
    pos.update(torch.ones(1, 3, dtype=torch.long))
    assert _aux_std_loss(y, pos).item() == pytest.approx(0.25)


def test_fsdp_needs_several_processes(runs, tmp_path, tiny_corpus):
    # checked against the process group when the run starts (the config itself reads no environment)
    with pytest.raises(WorkbenchError, match="torchrun"):
        RemovalConfig.of(fsdp=True).runtime.check_world(1)
    with pytest.raises(WorkbenchError, match="torchrun"):
        remove_ln(runs / "pre-ln", tmp_path / "x", RemovalConfig.of(fsdp=True), corpus=str(tiny_corpus), progress=False)
    assert not (tmp_path / "x").exists()


def test_ramp_blends_live_and_frozen_scale_geometrically(runs, tmp_path, tiny_corpus):
    x = torch.randn(2, 5, 8) * 3
    st = FrozenStandardize(2.0, centers=True, handover=handover("ramp", 4), live_eps=1e-5)
    st.progress = 0.25
    xc = x - x.mean(-1, keepdim=True)
    live = (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(st(x, lambda s: s), xc / (live.pow(0.75) * 2.0 ** 0.25))
    s = remove_ln(runs / "pre-ln", tmp_path / "ramp", RemovalConfig.of(**RC, bridge="ramp", bridge_steps=4, final_steps=0, control=False),
                  corpus=str(tiny_corpus), progress=False)
    assert s["final_steps"] == 4 and s["fold_max_abs_logit_diff"] < 1e-4  # the cool-down covers the last ramp


def test_scale_spread_is_the_variance_of_log_scale_averaged_over_sites():
    from workbench.removal.losses import log_scale, scale_spread

    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8) * torch.rand(2, 5, 1) * 3 for _ in range(3)]
    keep = torch.ones(2, 5, 1, dtype=torch.bool)
    keep[:, 0] = False  # position 0 (BOS) is not ordinary
    ref = []
    for x in xs:
        xc = (x - x.mean(-1, keepdim=True))[:, 1:]
        logs = torch.log(xc.pow(2).mean(-1).sqrt()).flatten()
        ref.append(logs.var(unbiased=False).item())
    got = scale_spread([log_scale(x, centers=True) for x in xs], keep)
    assert got.item() == pytest.approx(sum(ref) / 3, rel=1e-5)
    assert log_scale(torch.full((1, 1, 4), 2.0), centers=False).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_preconditioning_steps_come_first_and_count(runs, tmp_path, tiny_corpus):
    rc = RemovalConfig.of(**{**RC, "precondition": 3, "scale_loss": 0.5, "control": False})
    s = remove_ln(runs / "pre-ln", tmp_path / "pc", rc, corpus=str(tiny_corpus), progress=False)
    events = 3 * TINY_MODEL["n_layers"] + 2
    assert s["schedule"][0] == {"event": 0, "norm": "precondition", "step": 0}
    assert s["schedule"][1]["step"] == 3 and len(s["schedule"]) == events + 1
    assert s["steps"] == 3 + events * rc.schedule.steps_per_ln + s["final_steps"]
    assert is_norm_free(workbench.load(tmp_path / "pc"))
