"""LayerNorm removal of the modern norm sites: norms on sub-layer outputs (sandwich / Peri-LN, OLMo 2's
reordered norm, Gemma's RMSNorm sandwich) and QK-norm (one σ per head, or one over the whole projection).

References: the per-head σ against the RMS of the projection each QK-norm reads (captured as that module's
input, not through its hook), the frozen per-head division written out, the folded model against the
unfolded one it must equal, and DLA against the direct effect once every norm is gone."""

from __future__ import annotations

import math

import pytest
import torch

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from test_removal import RC, heavy
from workbench.analysis.dla import direct_logit_attribution
from workbench.errors import WorkbenchError
from workbench.model.fold import fold_norms
from workbench.norms.frozen import FrozenStandardize, SpecialPositions
from workbench.removal import RemovalConfig, is_norm_free, remove_ln
from workbench.removal.calibrate import calibrate, freeze
from workbench.removal.gpt_sites import GPTRemoval

VARIANTS = [
    ("peri-ln", {}),
    ("post-sub", {}),
    ("peri-rms", {}),
    ("qk-norm", {"n_key_value_heads": 2}),
    ("post-sub", {"qk_norm": "proj", "n_key_value_heads": 2}),  # OLMo 2
    ("peri-rms", {"qk_norm": "head", "n_key_value_heads": 1}),  # Gemma 3's norms
]


def _tokens(seed: int = 2, n: int = 24) -> torch.Tensor:
    return torch.randint(0, 64, (3, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm,kw", VARIANTS)
def test_fold_of_every_frozen_site_is_exact(norm, kw):
    adapter = GPTRemoval(heavy(norm, **kw))
    tokens, positions = _tokens(), SpecialPositions(eot_id=None)
    for site in adapter.sites:  # one at a time, each at the scale the live norm had, as in the schedule
        freeze(site.norm, calibrate(adapter, site.norm, tokens, positions), None)
    folded = adapter.fold()
    ref = adapter.net(tokens)
    assert (folded(tokens) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert folded.cfg.norm == "none" and folded.cfg.qk_norm is None and is_norm_free(folded)
    assert not any("norm" in name or ".ln" in name for name, _ in folded.named_parameters())


def test_the_schedule_takes_output_norms_first_and_qk_norms_before_the_qk_path():
    names = [s.name for s in GPTRemoval(heavy("peri-rms", qk_norm="head")).sites]
    L = range(3)
    assert names == ([f"blocks.{i}.ln2_post" for i in L] + [f"blocks.{i}.ln1_post" for i in L]
                     + [f"blocks.{i}.ln2" for i in L] + [f"blocks.{i}.attn.q_norm" for i in L]
                     + [f"blocks.{i}.attn.k_norm" for i in L] + [f"blocks.{i}.ln1" for i in L]
                     + [f"blocks.{i}.ln1_v" for i in L] + ["ln_final"])
    # OLMo 2 has no norm on the sub-layer inputs: nothing to freeze there
    olmo = [s.name for s in GPTRemoval(heavy("post-sub", qk_norm="proj")).sites]
    assert not any(n.endswith(("ln1", "ln2", "ln1_v")) for n in olmo) and len(olmo) == 4 * 3 + 1


@torch.no_grad()
def test_a_per_head_qk_norm_is_calibrated_per_head_from_its_projection():
    adapter = GPTRemoval(heavy("qk-norm", n_key_value_heads=2))
    norm = adapter.net.blocks[1].attn.k_norm
    seen = []
    handle = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # the raw key projection
    tokens = _tokens(5)
    positions = SpecialPositions(eot_id=7)
    try:
        entry = calibrate(adapter, norm, tokens, positions)
    finally:
        handle.remove()
    k = seen[0]  # [batch, pos, kv_head, d_head]
    s2 = k.pow(2).mean(-1) + norm.standardize.eps  # each head's scale², per token
    ordinary = positions.ordinary().squeeze(-1)
    want = [math.sqrt(s2[..., h][ordinary].mean().item()) for h in range(2)]
    want_bos = [math.sqrt(s2[:, 0, h].mean().item()) for h in range(2)]
    assert entry["sigma"] == pytest.approx(want, rel=1e-5) and entry["sigma_bos"] == pytest.approx(want_bos, rel=1e-5)
    assert abs(want[0] - want[1]) > 1e-3 * want[0]  # two heads, two scales: one shared σ would be wrong
    q = calibrate(adapter, norm, tokens, positions, statistic="median")
    assert q["sigma"] == pytest.approx([s2[..., h][ordinary].sqrt().median().item() for h in range(2)], rel=1e-5)


def test_a_frozen_per_head_norm_divides_each_head_by_its_own_sigma():
    positions = SpecialPositions(eot_id=None)
    tokens = _tokens(1, 6)
    positions.update(tokens)
    st = FrozenStandardize([2.0, 4.0, 8.0], centers=False, positions=positions, sigma_bos=[1.0, 0.5, 0.25])
    x = torch.randn(3, 6, 3, 5)
    y = st(x, lambda s: s)
    for h, (sigma, bos) in enumerate(((2.0, 1.0), (4.0, 0.5), (8.0, 0.25))):
        torch.testing.assert_close(y[:, 1:, h], x[:, 1:, h] / sigma)
        torch.testing.assert_close(y[:, 0, h], x[:, 0, h] / bos)
    st.special = False
    torch.testing.assert_close(st(x, lambda s: s)[:, 0, 2], x[:, 0, 2] / 8.0)


def test_a_live_qk_norm_is_refused_by_the_fold_in_one_line():
    adapter = GPTRemoval(heavy("qk-norm"))
    for site in adapter.sites:  # every norm frozen but one QK-norm
        if site.name != "blocks.1.attn.k_norm":
            freeze(site.norm, calibrate(adapter, site.norm, _tokens(), SpecialPositions(eot_id=None)), None)
    with pytest.raises(WorkbenchError, match=r"blocks\.1\.attn\.k_norm still normalizes by a live statistic"):
        fold_norms(adapter.net)


@pytest.mark.parametrize("norm", ["peri-ln", "post-sub", "qk-norm"])
def test_remove_ln_end_to_end_leaves_exact_dla(norm, tmp_path, tiny_corpus):
    workbench.train(norm, tmp_path / norm, steps=8, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    s = remove_ln(tmp_path / norm, tmp_path / "free", RemovalConfig.of(**RC), corpus=str(tiny_corpus), progress=False)
    assert s["fold_max_abs_logit_diff"] < 1e-4 and s["schedule"][-1]["norm"] == "special positions"
    free = workbench.load(tmp_path / "free")
    assert free.cfg.norm == "none" and free.cfg.qk_norm is None and is_norm_free(free)
    before = direct_logit_attribution(workbench.load(tmp_path / norm), "And God said", answer=" the")
    after = direct_logit_attribution(free, "And God said", answer=" the")
    for r in (before, after):
        assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    assert after.nmae <= 1e-5 < 1e-3 < before.nmae
    assert workbench.load(tmp_path / "free" / "control").cfg.norm == norm
