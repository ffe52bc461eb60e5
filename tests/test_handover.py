"""Hand-overs (``workbench.norms.handover``) against their formulas written out here, and the claim that a
new hand-over is one registered class: one is added in this file and runs through remove-ln end to end."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import build_parser
from workbench.errors import WorkbenchError
from workbench.norms.frozen import FrozenStandardize
from workbench.norms.handover import HANDOVERS, HandOver, handover, register
from workbench.removal import RemovalConfig, is_norm_free, remove_ln

G = torch.Generator().manual_seed(3)
LIVE = torch.rand(2, 7, 1, generator=G) * 20 + 0.1  # per-token scales spread over two decades
FROZEN = torch.full((1, 1, 1), 3.0)

FORMULAS = {  # the module docstring's table, written out per position with Python floats
    "none": lambda s, f, a: f,
    "ramp": lambda s, f, a: s ** (1 - a) * f ** a,
    "clip": lambda s, f, a: max(f, (1 - a) * s),
    "taper": lambda s, f, a: 1 / ((0.5 * (1 + math.cos(math.pi * a))) / s + (1 - 0.5 * (1 + math.cos(math.pi * a))) / f),
}


def test_the_registry_is_the_four_documented_hand_overs():
    assert list(HANDOVERS) == ["none", "ramp", "clip", "taper"]
    with pytest.raises(ValueError, match="registered twice"):
        register(HANDOVERS["ramp"])


@pytest.mark.parametrize("name", list(FORMULAS))
@pytest.mark.parametrize("a", [0.0, 0.3, 0.75, 1.0])
def test_each_scale_is_its_written_out_formula(name, a):
    h = handover(name, 0 if name == "none" else 4)
    got = h.scale(LIVE, FROZEN, a)
    want = torch.tensor([[[FORMULAS[name](s, 3.0, a)] for s in row[:, 0].tolist()] for row in LIVE])
    torch.testing.assert_close(got.expand_as(want), want, rtol=1e-6, atol=0)
    if a == 1.0:  # every hand-over ends at the frozen scale: what makes the fold exact
        torch.testing.assert_close(got.expand_as(want), FROZEN.expand_as(want))
    if a == 0.0 and name != "none":  # and starts at the live one, except clip where σ is above it
        start = torch.maximum(LIVE, FROZEN) if name == "clip" else LIVE
        torch.testing.assert_close(got, start, rtol=1e-6, atol=0)


def test_progress_is_one_over_steps_per_step_and_capped():
    h = handover("ramp", 4)
    assert [h.progress(n) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert handover("none").progress(0) == 1.0


def test_clip_reports_the_share_still_normalized():
    seen = handover("clip", 2).observe(LIVE, FROZEN, 0.5)["clipped"].item()
    assert seen == pytest.approx(sum(0.5 * s > 3.0 for s in LIVE.flatten().tolist()) / LIVE.numel())
    assert handover("ramp", 2).observe(LIVE, FROZEN, 0.5) == {}


@pytest.mark.parametrize("name,steps,message", [
    ("ramp", 0, "--bridge ramp needs --bridge-steps N ≥ 1"),
    ("none", 3, "--bridge-steps needs a hand-over (ramp, clip, taper)"),
    ("smooth", 3, "--bridge must be one of none, ramp, clip, taper, got 'smooth'"),
])
def test_bad_hand_overs_are_refused_in_one_line(name, steps, message):
    with pytest.raises(WorkbenchError) as e:
        handover(name, steps)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["ramp", "clip", "taper"])
def test_the_frozen_norm_divides_by_its_hand_overs_scale(name):
    """FrozenStandardize with a hand-over at progress a is x_c / scale(s(x_c), σ, a), s = sqrt(mean x_c² + ε)."""
    x = torch.randn(2, 5, 8, generator=G) * torch.linspace(0.2, 9, 5).reshape(1, 5, 1) + 0.7
    st = FrozenStandardize(3.0, centers=True, handover=handover(name, 4), live_eps=1e-5, frozen_at=10)
    st.hand_over_at(11)  # the second step after freezing: a = 2/4
    assert st.progress == 0.5
    xc = x - x.mean(-1, keepdim=True)
    s = (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    want = torch.stack([torch.stack([xc[b, p] / FORMULAS[name](s[b, p, 0].item(), 3.0, 0.5) for p in range(5)])
                        for b in range(2)])
    torch.testing.assert_close(st(x, lambda v: v), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(WorkbenchError, match=rf"still being handed over from its live scale \(--bridge {name}\)"):
        st.fold_scale("blocks.0.ln1")
    st.hand_over_at(13)
    assert st.fold_scale("blocks.0.ln1").item() == 3.0


def test_a_hand_over_needs_a_live_rms_scale():
    with pytest.raises(WorkbenchError, match="--bridge ramp needs a LayerNorm or RMSNorm"):
        FrozenStandardize(3.0, centers=False, handover=handover("ramp", 2), live_eps=None)


@dataclass
class Linear(HandOver):
    """linear blend (1−a)·s + a·σ"""

    name = "linear"

    def scale(self, live, frozen, progress):
        return (1 - progress) * live + progress * frozen


def test_a_new_hand_over_is_one_registered_class(monkeypatch, tmp_path, tiny_corpus):
    monkeypatch.setitem(HANDOVERS, "linear", Linear)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["remove-ln"]
    # the flag's help is read from the registry when the parser is built… and the config accepts it
    rc = RemovalConfig.of(bridge="linear", bridge_steps=2, steps_per_ln=1, tokens_per_step=64, eval_batches=2,
                          eval_batch_size=4, warmup_steps=1, dtype="float32", control=False)
    assert any(a.dest == "bridge" for a in sub._actions)
    src = tmp_path / "src"
    workbench.train("pre-ln", src, steps=4, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    s = remove_ln(src, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert s["config"]["bridge"] == "linear" and s["final_steps"] >= 2
    assert s["fold_max_abs_logit_diff"] <= 1e-4 and is_norm_free(workbench.load(tmp_path / "free"))
