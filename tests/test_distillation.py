"""Issue 24's parts: the distillation objective (``--objective ce|kl|mix``), the logit-scale anchor
(``--logit-anchor W``) and the truncated test bed (``workbench truncate``). Each against its formula
written out or an independent reference (transformers' own hidden states), then end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import workbench
from conftest import SWIGLU, scale_gpt
from workbench.batches import load_token_data
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT
from workbench.model.truncate import truncate, truncation_error
from workbench.norms.frozen import SpecialPositions
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal.calibrate import calibrate, freeze
from workbench.removal.gpt_sites import GPTRemoval
from workbench.removal.losses import Losses, LossWatch, kl_to_teacher, logit_anchor_loss



# --- the formulas ------------------------------------------------------------------------------------

def _binary_kl(t: list[float], s: list[float]) -> float:
    """KL(p ‖ q) of two two-token distributions given by their logits, written out."""
    p = 1 / (1 + math.exp(t[1] - t[0]))
    q = 1 / (1 + math.exp(s[1] - s[0]))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_kl_is_the_hand_computed_two_token_divergence_averaged_over_positions():
    teacher = torch.tensor([[[0.3, -1.2], [2.0, 0.5]], [[-0.7, 0.4], [1.5, 1.5]]])
    student = torch.tensor([[[1.0, 0.1], [-0.4, 0.9]], [[0.2, -2.0], [0.0, 3.0]]])
    expected = sum(_binary_kl(teacher[b, p].tolist(), student[b, p].tolist()) for b in range(2) for p in range(2)) / 4
    assert kl_to_teacher(teacher, student).item() == pytest.approx(expected, rel=1e-6)
    assert kl_to_teacher(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # direction: KL(teacher ‖ student), not the reverse
    assert kl_to_teacher(student, teacher).item() != pytest.approx(expected, rel=1e-3)


def test_objectives_combine_ce_and_kl_as_documented():
    ce, kl = torch.tensor(3.0), torch.tensor(0.25)
    assert Losses(objective="ce").language_loss(ce, None).item() == 3.0
    assert Losses(objective="kl").language_loss(ce, kl).item() == 0.25
    assert Losses(objective="mix", kl_weight=2.0).language_loss(ce, kl).item() == 3.5
    assert not Losses().distils and Losses(objective="mix").distils


def test_the_teacher_of_each_arm():
    assert Losses(objective="kl").teacher_of(True) == Losses(objective="kl").teacher_of(False) == "original"
    assert Losses(objective="kl", teacher="control").teacher_of(True) == "control"
    assert Losses(objective="kl", teacher="control").teacher_of(False) is None  # the control trains on ce
    assert Losses().teacher_of(True) is None
    rc = RemovalConfig.of(objective="mix", teacher="control")
    assert rc.for_arm(True) is rc and rc.for_arm(False).losses.objective == "ce"
    with pytest.raises(WorkbenchError, match="--teacher control is not supported with --fsdp"):
        RemovalConfig.of(objective="kl", teacher="control", fsdp=True)


def test_logit_anchor_is_the_squared_log_ratio_of_each_token_scale_to_sigma():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.5, 4, 5)[None, :, None]
    keep = torch.ones(2, 5, 1, dtype=torch.bool)
    keep[:, 0] = False
    sigma = torch.tensor(1.7)
    s = x.pow(2).mean(-1).sqrt()  # RMSNorm's scale, no centering
    expected = ((torch.log(s[:, 1:]) - math.log(1.7)) ** 2).mean()
    assert logit_anchor_loss(x, sigma, False, keep).item() == pytest.approx(expected.item(), rel=1e-5)
    xc = x - x.mean(-1, keepdim=True)  # LayerNorm's: centered
    expected_c = ((torch.log(xc.pow(2).mean(-1).sqrt()[:, 1:]) - math.log(1.7)) ** 2).mean()
    assert logit_anchor_loss(x, sigma, True, keep).item() == pytest.approx(expected_c.item(), rel=1e-5)


def test_the_anchor_acts_only_once_the_final_norm_is_frozen():
    model = scale_gpt(GPT(ModelConfig(norm="pre-rms", n_layers=2, d_model=32, n_heads=4, n_ctx=24, d_vocab=64,
                                      **SWIGLU)))
    adapter = GPTRemoval(model)
    tokens = torch.randint(1, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    positions = SpecialPositions(None, 1)
    watch = LossWatch(adapter, anchor=2.0)
    positions.update(tokens)
    adapter.net(tokens)
    assert watch.objective(torch.tensor(1.0), positions).item() == 1.0  # live: the norm anchors the scale
    entry = calibrate(adapter, adapter.final_norm, tokens, positions, None, "rms")
    freeze(adapter.final_norm, entry, positions, 0.0, None, 0, torch.device("cpu"))
    watch.clear()
    adapter.net(tokens)
    sigma = adapter.final_norm.standardize.ordinary_scale()
    expected = 1.0 + 2.0 * logit_anchor_loss(watch.final[-1], sigma, False, positions.ordinary()).item()
    assert watch.objective(torch.tensor(1.0), positions).item() == pytest.approx(expected, rel=1e-6) and expected > 1.01
    watch.remove()


# --- end to end ----------------------------------------------------------------------------------------

def _rc(**kw) -> RemovalConfig:
    return RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                            final_steps=2, **kw)


def test_distilled_removal_records_kl_and_its_summary_matches_a_direct_computation(swiglu_run, tmp_path, tiny_corpus):
    s = remove_ln(swiglu_run, tmp_path / "free", _rc(objective="mix", kl_weight=0.5, logit_anchor=0.1),
                  corpus=str(tiny_corpus), progress=False)
    assert s["objective"] == "mix" and s["config"]["kl_weight"] == 0.5
    metrics = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["kl"] >= 0 for m in metrics)
    # the summary's KL, recomputed here from the written models and the same validation windows
    original, free, control = (workbench.load(d) for d in (swiglu_run, tmp_path / "free", tmp_path / "free" / "control"))
    data = load_token_data(str(tiny_corpus), original.cfg.d_vocab, tokenizer=original.tokenizer)
    val = data.val_batches(2, 4, s["n_ctx"])

    def kl(model) -> float:
        with torch.no_grad():
            per = [F.kl_div(torch.log_softmax(model(b), -1).flatten(0, 1), torch.log_softmax(original(b), -1).flatten(0, 1),
                            log_target=True, reduction="batchmean").item() for b in val]
        return sum(per) / len(per)

    assert s["kl_ln_free_to_original"] == pytest.approx(kl(free), rel=1e-4, abs=1e-6)
    assert s["kl_control_to_original"] == pytest.approx(kl(control), rel=1e-4, abs=1e-6)
    assert s["kl_ln_free_to_original"] > 0
    assert [r["probe"] for r in s["robustness"]][:3] == ["held-out text", "held-out text after BOS", "random tokens"]
    assert len(s["robustness_control"]) == len(s["robustness"]) and all(r["finite"] for r in s["robustness_control"])


def test_plain_ce_removal_records_no_kl_per_step(swiglu_run, tmp_path, tiny_corpus):
    s = remove_ln(swiglu_run, tmp_path / "free", _rc(control=False), corpus=str(tiny_corpus), progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert s["objective"] == "ce" and not any("kl" in m for m in metrics)
    assert s["kl_ln_free_to_original"] is not None and s["kl_control_to_original"] is None


def test_the_kl_objective_trains_towards_the_teacher_not_the_corpus(swiglu_run, tmp_path, tiny_corpus):
    """Under --objective kl the gradient is KL's alone: a model that already equals the teacher gets a
    zero gradient (the control's first step), whatever its cross-entropy on the batch."""
    from workbench.removal.finetune import _accumulate

    model = workbench.load(swiglu_run)
    adapter = GPTRemoval(model)
    student = adapter.net.train()
    batch = load_token_data(str(tiny_corpus), 320, tokenizer=model.tokenizer).train_batch(0, 2, 32, 1)
    rc = _rc(objective="kl", dtype="float32")
    out = _accumulate(student, batch, rc, SpecialPositions(None, 1), rc.losses.watch(adapter), 1, teacher=model.eval())
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6) and out["loss"].item() > 1.0
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-5


def _kl(teacher, student, batches) -> float:
    """Mean over windows of KL(teacher ‖ student), written with torch's own kl_div."""
    with torch.no_grad():
        per = [F.kl_div(torch.log_softmax(student(b), -1).flatten(0, 1), torch.log_softmax(teacher(b), -1).flatten(0, 1),
                        log_target=True, reduction="batchmean").item() for b in batches]
    return sum(per) / len(per)


def test_the_removal_distils_from_the_finished_control_which_trains_on_ce(swiglu_run, tmp_path, tiny_corpus):
    """--teacher control: the control is the one a plain ce run trains (same weights), and the removal's
    first step — every norm still live, so the student is the original — measures KL(control ‖ original)."""
    kw = dict(precondition=1, dtype="float32")
    s = remove_ln(swiglu_run, tmp_path / "kl", _rc(objective="kl", teacher="control", **kw), corpus=str(tiny_corpus),
                  progress=False)
    remove_ln(swiglu_run, tmp_path / "ce", _rc(**kw), corpus=str(tiny_corpus), progress=False)
    assert s["teacher"] == "control" and s["config"]["teacher"] == "control" and s["batches"]["same"]
    original, free, control, control_ce = (workbench.load(d) for d in (
        swiglu_run, tmp_path / "kl", tmp_path / "kl" / "control", tmp_path / "ce" / "control"))
    for (name, a), b in zip(control.state_dict().items(), control_ce.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    data = load_token_data(str(tiny_corpus), original.cfg.d_vocab, tokenizer=original.tokenizer)
    first = data.train_batch(0, s["batch_size"], s["n_ctx"], 1)
    metrics = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    expected = _kl(control, original, [first])
    assert metrics[0]["kl"] == pytest.approx(expected, rel=1e-4) and expected > 1e-3
    val = data.val_batches(2, 4, s["n_ctx"])
    assert s["kl_ln_free_to_control"] == pytest.approx(_kl(control, free, val), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--objective", "distil"], "unknown --objective 'distil'; choose one of: ce, kl, mix"),
    (["--logit-anchor", "-1"], "--logit-anchor must be ≥ 0"),
    (["--objective", "mix", "--kl-weight", "-0.5"], "--kl-weight must be ≥ 0"),
    (["--objective", "kl", "--teacher", "student"], "unknown --teacher 'student'; choose one of: original, control"),
    (["--teacher", "control"], "--teacher control needs a distilling objective; add --objective kl"),
    (["--objective", "kl", "--teacher", "control", "--no-control"], "--teacher control distils from the control run"),
])
def test_bad_distillation_options_are_one_line_exit_2_and_write_nothing(swiglu_run, tmp_path, tiny_corpus, capsys,
                                                                       argv, message):
    out = tmp_path / "out"
    code = main(["remove-ln", str(swiglu_run), "--out", str(out), "--corpus", str(tiny_corpus), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# --- the truncated test bed ----------------------------------------------------------------------------

def test_truncated_llama_equals_transformers_hidden_state_through_the_final_norm(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = hf(input_ids=tokens, output_hidden_states=True).hidden_states[1]  # after block 0
        expected = hf.lm_head(hf.model.norm(hidden))
    assert main(["truncate", str(llama_dir), "--layers", "1", "--out", str(tmp_path / "t1")]) == 0
    short = workbench.load(tmp_path / "t1")
    assert short.cfg.n_layers == 1 and short.cfg.family == "llama"
    got = short(tokens)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    full = workbench.load(llama_dir)
    assert (got - full(tokens)).abs().max().item() > 1e-2  # the cut is a different model
    summary = json.loads((tmp_path / "t1" / "summary.json").read_text())
    assert summary["max_abs_logit_diff_vs_cache"] <= 1e-5 and summary["layers_kept"] == 1


def test_truncation_error_sees_a_wrong_cut():
    model = scale_gpt(GPT(ModelConfig(norm="pre-rms", n_layers=3, d_model=32, n_heads=4, n_ctx=24, d_vocab=64)))
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    assert truncation_error(model, truncate(model, 2), tokens) <= 1e-5
    wrong = truncate(model, 2)
    with torch.no_grad():
        wrong.blocks[1].load_state_dict(model.blocks[2].state_dict())  # the wrong block kept
    assert truncation_error(model, wrong, tokens) > 1e-3


@pytest.mark.parametrize("layers", ["0", "3"])
def test_truncate_refuses_a_depth_it_does_not_have(llama_dir, tmp_path, capsys, layers):
    code = main(["truncate", str(llama_dir), "--layers", layers, "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--layers must be between 1 and the model's 2 layers" in err
    assert not (tmp_path / "t").exists()


def test_truncate_refuses_a_scheme_whose_placement_depends_on_depth():
    model = GPT(ModelConfig(norm="mix-ln", n_layers=4, d_model=32, n_heads=4, n_ctx=24, d_vocab=64))
    with pytest.raises(WorkbenchError, match="placement depends on the model's depth"):
        truncate(model, 2)


# --- robustness of a norm-free model ---------------------------------------------------------------------

def test_robustness_rows_are_direct_computations_and_see_an_overflow(swiglu_run, tiny_corpus):
    from workbench.model.gpt import lm_cross_entropy
    from workbench.removal.robustness import bos_prefixed, robustness

    model = workbench.load(swiglu_run)
    data = load_token_data(str(tiny_corpus), model.cfg.d_vocab, tokenizer=model.tokenizer)
    rows = {r["probe"]: r for r in robustness(model, data, 16, torch.device("cpu"), sequences=4)}
    assert list(rows) == ["held-out text", "held-out text after BOS", "random tokens", "held-out text, 32 tokens"]
    held = data.val_batches(1, 4, 16)[0]
    with torch.no_grad():
        assert rows["held-out text"]["ce"] == pytest.approx(lm_cross_entropy(model(held), held).item(), rel=1e-6)
        after = bos_prefixed(held, model.bos_token_id)
        assert (after[:, 0] == model.bos_token_id).all() and (after[:, 1:] == held[:, :-1]).all()
        assert rows["held-out text after BOS"]["ce"] == pytest.approx(lm_cross_entropy(model(after), after).item(),
                                                                      rel=1e-6)
    assert all(r["finite"] for r in rows.values())
    with torch.no_grad():
        model.blocks[1].mlp.W_out[0, 0] = float("inf")  # an overflow in the last block
    assert not any(r["finite"] for r in robustness(model, data, 16, torch.device("cpu"), sequences=4))
