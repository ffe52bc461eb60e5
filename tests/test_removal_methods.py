"""Removal methods for gated (SwiGLU) MLPs: split MLP norm, one-sided scale penalty, clip and taper bridges.
Each against its formula, on models far from linear; then end to end through `remove-ln`."""

import json
import math

import pytest
import torch

import workbench
from conftest import SWIGLU, TINY_MODEL, TINY_TRAIN, rel_err, scale_gpt
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.norms.frozen import FrozenStandardize, SpecialPositions
from workbench.removal import RemovalConfig, is_norm_free, remove_ln
from workbench.norms.handover import handover
from workbench.removal.calibrate import calibrate, freeze
from workbench.removal.gpt_sites import GPTRemoval
from workbench.removal.losses import LossWatch, mlp_scale_penalty, token_scale



def heavy_swiglu(**kw) -> GPT:
    cfg = ModelConfig(norm="pre-rms", n_layers=3, d_model=32, n_heads=4, n_ctx=24, d_vocab=64, **SWIGLU, **kw)
    return scale_gpt(GPT(cfg))


def tokens(n=3, seed=1):
    t = torch.randint(1, 64, (n, 24), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 0
    return t


# --- bridges -----------------------------------------------------------------------------------------

def _bridged(kind: str, a: float, sigma=2.0):
    st = FrozenStandardize(sigma, centers=False, handover=handover(kind, 4), live_eps=1e-6)
    st.progress = a
    return st


def test_clip_bridge_normalizes_only_the_positions_above_sigma():
    x = torch.randn(2, 6, 16) * torch.tensor([0.5, 1, 2, 4, 8, 16]).reshape(1, 6, 1)
    live = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    for a in (0.0, 0.3, 0.9):
        st = _bridged("clip", a)
        y = st(x, lambda s: s)
        ref = x / torch.maximum(torch.tensor(2.0), (1 - a) * live)
        torch.testing.assert_close(y, ref)
        assert st.observed["clipped"].item() == pytest.approx(((1 - a) * live > 2.0).float().mean().item())
    # at a = 0 the quiet positions are already divided by σ, the loud ones still by their own scale
    y0 = _bridged("clip", 0.0)(x, lambda s: s)
    loud = live > 2.0
    torch.testing.assert_close(y0.pow(2).mean(-1, keepdim=True).sqrt()[loud], torch.ones(int(loud.sum())), atol=1e-4, rtol=0)
    done = _bridged("clip", 1.0)
    torch.testing.assert_close(done(x, lambda s: s), x / 2.0)
    assert "clipped" not in done.observed


def test_taper_bridge_blends_the_outputs_with_a_cosine_weight():
    x = torch.randn(2, 5, 16) * 3
    live = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    for a in (0.0, 0.25, 0.5, 0.8):
        g = 0.5 * (1 + math.cos(math.pi * a))
        seen = []
        y = _bridged("taper", a)(x, lambda s: seen.append(s) or s)
        torch.testing.assert_close(y, g * x / live + (1 - g) * x / 2.0)
        torch.testing.assert_close(seen[0], 1 / (g / live + (1 - g) / 2.0))  # hook_scale: the effective scale
    torch.testing.assert_close(_bridged("taper", 1.0)(x, lambda s: s), x / 2.0)


def test_special_positions_hand_over_geometrically_then_switch_off():
    x = torch.randn(1, 4, 8) * 3
    pos = SpecialPositions(eot_id=9)
    pos.update(torch.tensor([[1, 2, 9, 3]]))
    st = FrozenStandardize(2.0, centers=False, positions=pos, sigma_bos=8.0, sigma_eot=0.5)
    st.special_blend = 0.25
    want = torch.tensor([8.0 ** 0.75 * 2.0 ** 0.25, 2.0, 0.5 ** 0.75 * 2.0 ** 0.25, 2.0]).reshape(1, 4, 1)
    torch.testing.assert_close(st(x, lambda s: s), x / want)
    rc = RemovalConfig.of(special_steps=4)
    st.hand_over_at(12, special_off=10, special_steps=rc.calibration.special_steps)  # the hand-over's third step
    assert st.special and st.special_blend == 0.75
    st.hand_over_at(13, special_off=10, special_steps=rc.calibration.special_steps)
    assert not st.special  # complete: one σ for every position, foldable
    torch.testing.assert_close(st(x, lambda s: s), x / 2.0)


# --- the one-sided penalty ---------------------------------------------------------------------------

def test_mlp_penalty_is_one_sided_above_one_plus_delta_sigma():
    s = torch.tensor([20.0, 1.0, 1.0, 3.0, 9.0]).reshape(1, 5, 1)  # position 0 is BOS: not ordinary
    keep = torch.tensor([False, True, True, True, True]).reshape(1, 5, 1)
    sigma = math.sqrt((1 + 1 + 9 + 81) / 4)  # rms over the ordinary positions: BOS does not set σ…
    delta = 0.2
    want = sum(max(0.0, v / sigma - 1.2) ** 2 for v in (20.0, 1.0, 1.0, 3.0, 9.0)) / 5  # …but is penalised
    assert mlp_scale_penalty([s], keep, delta).item() == pytest.approx(want, rel=1e-6)
    assert max(0.0, 3.0 / sigma - 1.2) == 0 and max(0.0, 9.0 / sigma - 1.2) > 0  # only 9 and BOS's 20 are above
    uniform = torch.full((1, 5, 1), 4.0)
    assert mlp_scale_penalty([uniform], keep, 0.0).item() == 0.0
    two = mlp_scale_penalty([s, 2 * uniform], keep, delta).item()
    assert two == pytest.approx(want / 2, rel=1e-6)  # the mean over sites
    loudest = max(max(0.0, v / sigma - 1.2) ** 2 for v in (20.0, 1.0, 1.0, 3.0, 9.0))
    assert mlp_scale_penalty([s], keep, delta, pool="max").item() == pytest.approx(loudest, rel=1e-6)
    s2 = s.clone().requires_grad_()
    mlp_scale_penalty([s2], keep, delta).backward()
    g = s2.grad[0, :, 0]
    assert g[0] > 0 and g[4] > 0 and torch.all(g[1:4] == 0)  # σ is held constant: only outliers move
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(token_scale(x, centers=False), x.pow(2).mean(-1, keepdim=True).sqrt())


def test_mlp_penalty_watches_only_the_mlp_norms_not_yet_frozen():
    m = heavy_swiglu()
    adapter = GPTRemoval(m, split_mlp=True)
    rc = RemovalConfig.of(mlp_penalty=1.0)
    watch = rc.losses.watch(adapter)
    pos = SpecialPositions(eot_id=None)
    t = tokens()
    pos.update(t)
    adapter.net(t)
    assert len(watch.mlp_scales) == 6  # ln2 (gate) and ln2_up of 3 blocks
    up0 = adapter.sites[0]
    assert up0.name == "blocks.0.ln2_up" and up0.kind == "mlp"
    sig = calibrate(adapter, up0.norm, t, pos)
    freeze(up0.norm, {**sig, "step": 0}, pos)
    watch.clear()
    adapter.net(t)
    assert len(watch.mlp_scales) == 5
    watch.remove()


def test_frozen_penalty_is_one_sided_against_each_sites_frozen_sigma():
    """relu(s/σ_site − (1+δ))², written out: σ is the constant the site divides by (not this batch's rms), and
    a sink's position 0 (which keeps its live norm) is not counted."""
    from workbench.removal.losses import frozen_scale_penalty

    a = torch.tensor([9.0, 1.0, 2.5, 4.0]).reshape(1, 4, 1)
    b = torch.tensor([0.5, 0.5, 7.0, 0.1]).reshape(1, 4, 1)
    sig_a, sig_b, delta = torch.tensor(2.0), torch.tensor(3.0), 0.1
    pa = [max(0.0, v / 2.0 - 1.1) ** 2 for v in (9.0, 1.0, 2.5, 4.0)]
    pb = [max(0.0, v / 3.0 - 1.1) ** 2 for v in (0.5, 0.5, 7.0, 0.1)]
    got = frozen_scale_penalty([a, b], [sig_a, sig_b], delta).item()
    assert got == pytest.approx((sum(pa) / 4 + sum(pb) / 4) / 2, rel=1e-6)
    sink = torch.tensor([True, False, False, False]).reshape(1, 4, 1)
    got = frozen_scale_penalty([a, b], [sig_a, sig_b], delta, sink).item()
    assert got == pytest.approx((sum(pa[1:]) / 3 + sum(pb[1:]) / 3) / 2, rel=1e-6)
    # the live penalty's σ is the batch's own rms: on the same scales it gives another number
    keep = torch.ones(1, 4, 1, dtype=torch.bool)
    assert mlp_scale_penalty([a], keep, delta).item() != pytest.approx(sum(pa) / 4, rel=1e-3)
    # pooled by max: each site's loudest counted position in full (9.0 at a, 7.0 at b; with the sink, 4.0 at a)
    got = frozen_scale_penalty([a, b], [sig_a, sig_b], delta, pool="max").item()
    assert got == pytest.approx((max(pa) + max(pb)) / 2, rel=1e-6)
    got = frozen_scale_penalty([a, b], [sig_a, sig_b], delta, sink, pool="max").item()
    assert got == pytest.approx((max(pa[1:]) + max(pb[1:])) / 2, rel=1e-6)
    s = a.clone().requires_grad_()
    frozen_scale_penalty([s], [sig_a], delta, pool="max").backward()
    assert s.grad[0, 0, 0] > 0 and (s.grad[0, 1:] == 0).all()  # only the loudest position is pushed down
    s = a.clone().requires_grad_()
    sig = torch.tensor(2.0, requires_grad=True)
    frozen_scale_penalty([s], [sig], delta).backward()
    assert sig.grad is None or sig.grad == 0  # σ is a constant of the frozen norm
    assert s.grad[0, 1, 0] == 0 and s.grad[0, 0, 0] > 0 and s.grad[0, 3, 0] > 0


def test_frozen_penalty_watches_the_frozen_mlp_norms_with_their_sigma():
    m = heavy_swiglu()
    adapter = GPTRemoval(m, split_mlp=True)
    rc = RemovalConfig.of(frozen_penalty=2.0, penalty_delta=0.05)
    watch = rc.losses.watch(adapter)
    pos = SpecialPositions(eot_id=None)
    t = tokens()
    pos.update(t)
    adapter.net(t)
    assert watch.frozen_scales == [] and watch.mlp_scales == []  # nothing frozen; the live penalty is off
    up0 = adapter.sites[0]
    seen = []
    h = up0.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    sig = calibrate(adapter, up0.norm, t, pos)
    freeze(up0.norm, {**sig, "step": 0}, pos)
    watch.clear()
    seen.clear()
    adapter.net(t)
    h.remove()
    assert len(watch.frozen_scales) == 1
    sigma = up0.norm.standardize.ordinary_scale()
    x = seen[0].float()
    scale = x.pow(2).mean(-1, keepdim=True).sqrt()  # RMSNorm: no centering
    want = 2.0 * torch.relu(scale / sigma - 1.05).pow(2).mean()
    loss = torch.tensor(1.5)
    assert (watch.objective(loss, pos) - loss).item() == pytest.approx(want.item(), rel=1e-5)
    assert want.item() > 0  # the heavy model has positions above 1.05 σ: the check can fail
    watch.pool = "max"  # what --penalty-pool max sets
    assert (watch.objective(loss, pos) - loss).item() == pytest.approx(
        2.0 * torch.relu(scale / sigma - 1.05).pow(2).max().item(), rel=1e-5)
    assert RemovalConfig.of(frozen_penalty=1.0, penalty_pool="max").losses.watch(adapter).pool == "max"
    watch.remove()



# --- the training-only guard ------------------------------------------------------------------------

def _at_rms(rms: list[float], d=16, seed=0) -> torch.Tensor:
    """[1, pos, d] rows of exactly the given RMS (no centering: an RMSNorm's scale), far from uniform."""
    v = torch.randn(len(rms), d, generator=torch.Generator().manual_seed(seed))
    v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
    return (v * torch.tensor(rms).reshape(-1, 1)).unsqueeze(0)


def test_guard_soft_caps_each_positions_output_rms_in_training_only():
    """Output RMS r = s/σ for r ≤ C, C·(1 + ln(r/C)) above, written out; slope 1 then C/r (never 0, never
    NaN — also for the quiet positions, where the unused branch's log would be ≤ −1); off in eval."""
    sigma, cap, eps = 2.0, 3.0, 1e-6
    rms = [0.5, 1.0, 2.0, 7.0, 8.0, 40.0, 4000.0]
    st = FrozenStandardize(sigma, centers=False, live_eps=eps, guard=cap)
    x = _at_rms(rms)
    seen = []
    y = st.train()(x, lambda s: seen.append(s) or s)
    r = [math.sqrt(v * v + eps) / sigma for v in rms]
    want = [v if v <= cap else cap * (1 + math.log(v / cap)) for v in r]
    got = y.pow(2).mean(-1).sqrt().flatten().tolist()
    assert got == pytest.approx(want, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(y, x, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # each position only rescaled
    torch.testing.assert_close(seen[0].expand_as(x), x / y)  # hook_scale sees the effective divisor
    assert st.observed["guarded"].item() == pytest.approx(4 / 7)  # the share of positions above C
    torch.testing.assert_close(st.eval()(x, lambda s: s), x / sigma)  # evaluation: the plain frozen norm
    for v in rms:  # d(output RMS)/d(input RMS), against the formula's derivative
        s = torch.tensor(v, requires_grad=True)
        st.train()(_at_rms([1.0]) * s, lambda t: t).pow(2).mean().sqrt().backward()
        rv = math.sqrt(v * v + eps) / sigma
        slope = (1.0 if rv <= cap else cap / rv) * v / math.sqrt(v * v + eps) / sigma
        assert s.grad.item() == pytest.approx(slope, rel=1e-4), v
    with pytest.raises(workbench.WorkbenchError, match="--guard needs a LayerNorm or RMSNorm"):
        FrozenStandardize(sigma, centers=False, guard=cap)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> list[float]:
    return [m["loss"] for m in _metrics(run)]


def test_remove_ln_guard_reaches_every_frozen_norm_and_leaves_the_export_alone(swiglu_run, tmp_path, tiny_corpus,
                                                                             monkeypatch):
    from workbench.removal import finetune as ft

    made = []
    real = ft.freeze
    monkeypatch.setattr(ft, "freeze", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    base = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1, control=False)
    remove_ln(swiglu_run, tmp_path / "plain", RemovalConfig.of(**base), corpus=str(tiny_corpus),
                      progress=False)
    made.clear()
    s = remove_ln(swiglu_run, tmp_path / "free", RemovalConfig.of(**base, guard=1.0), corpus=str(tiny_corpus),
                  progress=False)
    assert made and all(st.guard == 1.0 for st in made) and s["config"]["guard"] == 1.0
    # C = 1 caps every position above σ, so training differs from the unguarded run's from the first freeze on
    first = next(e["step"] for e in s["schedule"] if "sigma" in e)
    guarded, unguarded = (_losses(tmp_path / d) for d in ("free", "plain"))
    assert guarded[:first] == unguarded[:first] and guarded[first] != unguarded[first]
    shares = [m["guarded"] for m in _metrics(tmp_path / "free")[first:]]
    assert len(shares) == len(guarded) - first and 0 < max(shares) <= 1  # C = 1: some position is above σ
    assert s["fold_max_abs_logit_diff"] <= 1e-4  # the export is the unguarded frozen model, folded
    assert direct_logit_attribution(workbench.load(tmp_path / "free"), "And God said unto the", " the").nmae <= 1e-5

# --- the split MLP norm ------------------------------------------------------------------------------

def test_split_schedule_freezes_up_paths_first_and_gates_last():
    adapter = GPTRemoval(heavy_swiglu(), split_mlp=True)
    names = [s.name for s in adapter.sites]
    assert names[:3] == [f"blocks.{i}.ln2_up" for i in range(3)]
    assert names[3:6] == [f"blocks.{i}.ln1" for i in range(3)] and names[6:9] == [f"blocks.{i}.ln1_v" for i in range(3)]
    assert names[9] == "ln_final" and names[10:] == [f"blocks.{i}.ln2" for i in range(3)]
    with pytest.raises(workbench.WorkbenchError, match="needs a gated"):
        GPTRemoval(GPT(ModelConfig(norm="pre-rms", n_layers=1, d_model=16, n_heads=2, d_vocab=32)), split_mlp=True)


def test_with_the_gate_live_the_mlp_grows_like_x_not_x_squared():
    """The reason for the split: SiLU(W_g x/s(x)) is scale-free, so with the up path frozen the MLP is
    homogeneous of degree 1; with both frozen it grows like ‖x‖² (x large: SiLU(z) ≈ z for z > 0)."""
    m = heavy_swiglu(mlp_bias=False)
    adapter = GPTRemoval(m, split_mlp=True)
    block = adapter.net.blocks[1]
    x = torch.randn(2, 24, 32)

    def mlp(z):
        return block.mlp(block.ln2(z), block.ln2_up(z))

    block.ln2_up.standardize = FrozenStandardize(1.7, centers=False)
    k = 10.0
    assert rel_err(mlp(k * x), k * mlp(x)) <= 1e-5  # up to the live norm's ε
    block.ln2.standardize = FrozenStandardize(1.7, centers=False)
    growth = (mlp(k * x).norm() / mlp(x).norm()).item()
    assert growth > 0.4 * k * k, growth  # quadratic, not linear


def test_split_mlp_folds_exactly_into_w_gate_and_w_in_and_dla_is_exact():
    m = heavy_swiglu()
    adapter = GPTRemoval(m, split_mlp=True)
    t = tokens()
    pos = SpecialPositions(eot_id=None)
    for site in adapter.sites:
        st = FrozenStandardize(calibrate(adapter, site.norm, t, pos)["sigma"], False)
        if site.name.endswith("ln2_up"):
            st.sigma.mul_(3.0)  # far from the gate's σ: folding the wrong norm into W_in would show
        site.norm.standardize = st
    with torch.no_grad():
        want = adapter.net(t)
        free = adapter.fold()
        got = free(t)
    assert rel_err(got, want) <= 1e-5
    assert is_norm_free(free) and not free.cfg.split_ln2_up
    # the frozen model differs from the one where ln2_up equals ln2: the split is real
    for b in adapter.net.blocks:
        b.ln2_up = None
    with torch.no_grad():
        assert rel_err(adapter.net(t), want) > 1e-2


# --- end to end ----------------------------------------------------------------------------------------

def test_remove_ln_with_split_penalty_and_clip_bridge(swiglu_run, tmp_path, tiny_corpus):
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       split_mlp=True, mlp_penalty=1.0, penalty_delta=0.05, bridge="clip", bridge_steps=3,
                       final_steps=0)
    s = remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    names = [e["norm"] for e in s["schedule"]]
    assert names[:2] == ["blocks.0.ln2_up", "blocks.1.ln2_up"] and names[-3:] == ["blocks.0.ln2", "blocks.1.ln2",
                                                                                 "special positions"]
    assert s["final_steps"] == 3  # the cool-down covers the last bridge
    assert s["fold_max_abs_logit_diff"] <= 1e-4 and s["first_overflow_step"] is None
    assert s["norms_frozen_before_overflow"] == s["norms_total"] == 9
    free = workbench.load(tmp_path / "free")
    assert is_norm_free(free) and free.cfg.mlp == "swiglu"
    assert direct_logit_attribution(free, "And God said unto the", " the").nmae <= 1e-5
    control = workbench.load(tmp_path / "free" / "control")  # the control keeps the split, live norms
    assert control.cfg.split_ln2_up and control.blocks[0].ln2_up is not None
    clipped = [m["clipped"] for m in (__import__("json").loads(line) for line in
                                      (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()) if "clipped" in m]
    assert clipped and all(0.0 <= c <= 1.0 for c in clipped)


def test_taper_end_to_end_folds_exactly(swiglu_run, tmp_path, tiny_corpus):
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       bridge="taper", bridge_steps=2, control=False)
    s = remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert s["fold_max_abs_logit_diff"] <= 1e-4 and s["config"]["bridge"] == "taper"


@pytest.mark.parametrize("method", [dict(bridge="clip", bridge_steps=3), dict(bridge="taper", bridge_steps=3),
                                    dict(bridge="ramp", bridge_steps=3)])
def test_a_bridge_hands_over_in_exactly_its_steps(swiglu_run, tmp_path, tiny_corpus, monkeypatch, method):
    """The written-out schedule: in the j-th training step after a norm is frozen the progress is
    a = min(1, j / R) — 1/R in the first step, fully frozen from the R-th on — whatever the bridge."""
    import workbench.removal.api as api

    step, seen = [0], []  # seen: (training step index, norm's frozen_at, progress) per bridged forward
    blended = FrozenStandardize._handed_over

    def spy(self, xc, frozen):
        if torch.is_grad_enabled():  # a training forward, not calibration or evaluation
            seen.append((step[0], self.frozen_at, self.progress))
        return blended(self, xc, frozen)

    monkeypatch.setattr(FrozenStandardize, "_handed_over", spy)
    monkeypatch.setitem(api._ON_STEP, "removal", lambda n: step.__setitem__(0, n))
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       control=False, **method)
    s = remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    R = 3
    frozen_at = {e["step"] for e in s["schedule"] if e["norm"] != "special positions"}
    assert {f for _, f, _ in seen} == frozen_at and len(seen) > 3 * len(frozen_at)
    for t, f, a in seen:
        assert a == pytest.approx(min(1.0, (t - f + 1) / R)), (t, f, a)
    assert s["fold_max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("argv,message", [
    (["--mlp-penalty", "1", "--penalty-delta", "-0.1"], "--penalty-delta δ must be ≥ 0"),
    (["--mlp-penalty", "-1"], "--mlp-penalty must be ≥ 0"),
    (["--frozen-penalty", "-0.5"], "--frozen-penalty must be ≥ 0"),
    (["--guard", "0.5"], "--guard C must be 0 (off) or at least 1"),
    (["--penalty-pool", "median"], "--penalty-pool must be one of: mean, max"),
    (["--random-penalty", "-1", "--guard", "4"], "--random-penalty must be ≥ 0"),
    (["--random-penalty", "1"], "--random-penalty needs --guard C"),
    (["--bridge", "taper"], "--bridge taper needs --bridge-steps"),
    (["--bridge", "clip", "--bridge-steps", "0"], "--bridge clip needs --bridge-steps"),
    (["--bridge-steps", "4"], "--bridge-steps needs a hand-over (ramp, clip, taper)"),
    (["--bridge", "ramp"], "--bridge ramp needs --bridge-steps"),
    (["--bridge", "smooth", "--bridge-steps", "4"], "--bridge must be one of"),
    (["--special-steps", "-2"], "--special-steps must be ≥ 0"),
    (["--split-mlp", "GELU"], "needs a gated (SwiGLU) MLP"),
])
def test_bad_method_options_are_one_line_exit_2_and_write_nothing(swiglu_run, tmp_path, tiny_corpus, capsys, argv,
                                                                   message):
    src = swiglu_run
    if "GELU" in argv:
        argv = [a for a in argv if a != "GELU"]
        src = tmp_path / "gelu"
        workbench.train("pre-rms", src, steps=2, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False)
    out = tmp_path / "out"
    code = main(["remove-ln", str(src), "--out", str(out), "--corpus", str(tiny_corpus), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not list(tmp_path.glob(".out*"))


def test_overflow_summary_counts_the_norms_frozen_before_the_first_non_finite_step():
    from workbench.removal.api import overflow

    schedule = [{"event": 0, "norm": "precondition", "step": 0}] + [
        {"event": i + 1, "norm": f"site{i}", "step": 2 + 2 * i, "sigma": 1.0} for i in range(4)] + [
        {"event": 5, "norm": "special positions", "step": 10}]
    metrics = [{"step": s, "loss": 1.0} for s in range(1, 13)]
    assert overflow(schedule, metrics, 4) == {"first_overflow_step": None, "norms_frozen_before_overflow": 4,
                                              "norms_total": 4}
    metrics[6]["skipped"] = True  # metrics' step 7 is the step run at index 6: sites 0–2 (steps 2, 4, 6) frozen
    assert overflow(schedule, metrics, 4)["norms_frozen_before_overflow"] == 3
    assert overflow(schedule, metrics, 4)["first_overflow_step"] == 7


def test_dla_on_a_prompt_that_overflows_is_one_clear_error():
    """A norm-free gated model can square a loud position into inf (the failure this file is about):
    DLA then says so in one line instead of failing its sum check."""
    cfg = ModelConfig(norm="none", n_layers=3, d_model=32, n_heads=4, n_ctx=24, d_vocab=64, **SWIGLU)
    model = scale_gpt(GPT(cfg))
    with torch.no_grad():
        model.W_E.mul_(1e12)  # residual entries ~1e11: the first MLP squares them past float32's range
    with pytest.raises(workbench.WorkbenchError, match=r"overflows on this prompt \(non-finite from L\d"):
        direct_logit_attribution(model, tokens(1)[:, :8], 3)


def test_a_non_finite_calibration_stops_the_run_at_once(swiglu_run, tmp_path, tiny_corpus, monkeypatch):
    """An overflow in the calibration forward gives σ = NaN; installing it would only waste the next
    steps (SmolLM2 run S3): the run stops at that event, saying so."""
    from workbench.removal import finetune as ft

    real = ft.calibrate
    calls = []

    def poisoned(adapter, norm, batch, *a, **k):
        calls.append(1)
        out = real(adapter, norm, batch, *a, **k)
        return {**out, "sigma": float("nan")} if len(calls) == 3 else out

    monkeypatch.setattr(ft, "calibrate", poisoned)
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       control=False)
    with pytest.raises(ft.Diverged, match="overflows on the calibration batch") as e:
        remove_ln(swiglu_run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert len(e.value.metrics) == 2 and math.isnan(e.value.schedule[-1]["sigma"])  # stopped before step 3
    assert not (tmp_path / "free").exists() and not (tmp_path / "free.partial").exists()
