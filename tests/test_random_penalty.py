"""``--random-penalty W``: the frozen MLP norms' one-sided penalty on a window of random tokens each step,
against its formula (the norm inputs read off by a hook), then through ``remove-ln``: only the removal arm,
from the first freeze on, the same window on a resume."""

import json

import pytest
import torch

from conftest import SWIGLU, scale_gpt
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.norms.frozen import SpecialPositions
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal.calibrate import calibrate, freeze
from workbench.removal.gpt_sites import GPTRemoval


def _rc(**kw) -> RemovalConfig:
    return RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                            final_steps=2, split_mlp=True, guard=4.0, **kw)


def test_random_term_is_w_times_the_frozen_penalty_written_out():
    """W · mean over frozen MLP sites of max over positions ≥ 1 (position 0: a sink prefix's, kept live) of
    relu(s/σ − (1+δ))², s the RMS each site's input has on the window, σ the site's frozen constant."""
    m = scale_gpt(GPT(ModelConfig(norm="pre-rms", n_layers=3, d_model=32, n_heads=4, n_ctx=24, d_vocab=64,
                                  **SWIGLU)))
    adapter = GPTRemoval(m, split_mlp=True)
    rc = RemovalConfig.of(random_penalty=3.0, penalty_delta=0.05, penalty_pool="max", guard=4.0)
    watch = rc.losses.watch(adapter)
    pos = SpecialPositions(eot_id=None)
    corpus = torch.randint(1, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    pos.update(corpus)
    sites = adapter.sites[:2]  # two up-path norms, frozen at σ from a corpus batch
    for site in sites:
        freeze(site.norm, {**calibrate(adapter, site.norm, corpus, pos), "step": 0}, pos)
    seen = {}
    hooks = [s.norm.register_forward_pre_hook(lambda mod, args, n=s.name: seen.__setitem__(n, args[0].detach()))
             for s in sites]
    window = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(7))
    pos.update(window)
    watch.clear()
    adapter.net(window)
    got = watch.random_term(pos)
    for h in hooks:
        h.remove()
    want = []
    for s in sites:
        scale = seen[s.name].float().pow(2).mean(-1).sqrt()[0, 1:]  # RMSNorm: no centering; position 0 left out
        want.append(torch.relu(scale / s.norm.standardize.ordinary_scale() - 1.05).pow(2).max())
    want = 3.0 * torch.stack(want).mean()
    assert want.item() > 0  # the heavy model has a position above 1.05 σ: the check can fail
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert watch.frozen_scales  # collected although --frozen-penalty (the corpus term) is off ...
    loss = torch.tensor(2.0)
    assert watch.objective(loss, pos).item() == pytest.approx(2.0)  # ... which adds nothing to the corpus loss
    watch.remove()


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_remove_ln_adds_the_term_on_the_removal_arm_from_the_first_freeze(swiglu_run, tmp_path, tiny_corpus):
    base = remove_ln(swiglu_run, tmp_path / "plain", _rc(penalty_delta=0.0), corpus=str(tiny_corpus), progress=False)
    s = remove_ln(swiglu_run, tmp_path / "free", _rc(penalty_delta=0.0, random_penalty=5.0), corpus=str(tiny_corpus),
                  progress=False)
    assert s["config"]["random_penalty"] == 5.0
    plain, free = _metrics(tmp_path / "plain"), _metrics(tmp_path / "free")
    first = next(e["step"] for e in s["schedule"] if "sigma" in e)
    assert all("random_penalty" not in m for m in free[:first])  # nothing frozen yet: no random window
    terms = [m["random_penalty"] for m in free[first:]]
    assert len(terms) == len(free) - first and max(terms) > 0 and all(m["random_peak"] > 0 for m in free[first:])
    losses = lambda ms: [m["loss"] for m in ms]  # noqa: E731
    # the term's gradient reaches the weights: same batches, same losses up to the first step after a freeze
    assert losses(free)[:first + 1] == losses(plain)[:first + 1] and losses(free)[first + 1:] != losses(plain)[first + 1:]
    assert [m["control_loss"] for m in free] == [m["control_loss"] for m in plain]  # the control never sees it
    assert all("random_penalty" not in m for m in plain)
    assert s["ce_control"] == base["ce_control"] and s["fold_max_abs_logit_diff"] <= 1e-4


class Killed(BaseException):
    """Stands for SIGKILL."""


def test_a_killed_run_resumes_to_the_same_weights_redrawing_the_same_windows(swiglu_run, tiny_corpus, tmp_path,
                                                                              monkeypatch):
    from safetensors.torch import load_file

    from workbench.removal import api
    from workbench.removal import finetune as ft

    drawn: list[tuple[int, torch.Tensor]] = []
    real = ft._Loop.random_window
    monkeypatch.setattr(ft._Loop, "random_window", lambda self, step, start: drawn.append(
        (step, real(self, step, start))) or drawn[-1][1])
    rc = _rc(random_penalty=1.0, control=False, checkpoint_every=4, dtype="float32")  # exact arithmetic
    remove_ln(swiglu_run, tmp_path / "ref", rc, corpus=str(tiny_corpus), progress=False)
    once = dict(drawn)
    windows = list(once.values())
    assert len(once) == len(drawn) > 4 and all(not torch.equal(windows[0], w) for w in windows[1:])  # new each step
    assert len({int(w[0, 0]) for w in windows}) == 1  # behind the corpus windows' own first token
    assert all(w.shape == (1, 32) and 0 <= int(w.min()) and int(w.max()) < 320 for w in windows)

    def kill(step):
        if step == max(once) - 1:
            raise Killed

    monkeypatch.setitem(api._ON_STEP, "removal", kill)
    with pytest.raises(Killed):
        remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    monkeypatch.setitem(api._ON_STEP, "removal", None)
    drawn.clear()
    s = remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert s["resumed_from_step"] and drawn and all(torch.equal(once[k], w) for k, w in drawn)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "free" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "free" / "metrics.jsonl").read_text()


def test_behind_a_sink_prefix_the_window_starts_with_the_sink_token_and_position_0_is_not_penalised(
        hf_dirs, tmp_path, tiny_corpus, monkeypatch):
    """On a Llama with the exact sink prefix (what SmolLM2's runs use): every random window starts with the
    sink token, and the term leaves position 0 out (it keeps its live norm)."""
    from workbench.removal import finetune as ft
    from workbench.removal import losses

    seen = []
    real_window, real_pen = ft._Loop.random_window, losses.frozen_scale_penalty
    monkeypatch.setattr(ft._Loop, "random_window", lambda self, step, start: seen.append(
        ("window", real_window(self, step, start))) or seen[-1][1])
    monkeypatch.setattr(losses, "frozen_scale_penalty", lambda scales, sigmas, delta, sink=None, pool="mean": seen.append(
        ("sink", sink)) or real_pen(scales, sigmas, delta, sink, pool))
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          sink_prefix=True, random_penalty=1.0, guard=4.0, control=False)
    remove_ln(hf_dirs["llama"], tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    windows = [w for k, w in seen if k == "window"]
    sinks = [m for k, m in seen if k == "sink"]
    from workbench.model import sink

    assert windows and {int(w[0, 0]) for w in windows} == {sink.read(tmp_path / "free" / sink.SINK_FILE).token}
    assert sinks and all(m is not None and m[:, 0].all() and not m[:, 1:].any() for m in sinks)
    assert any("random_penalty" in m for m in _metrics(tmp_path / "free"))
