"""Direct logit attribution through norms on sub-layer outputs (sandwich / Peri-LN, OLMo 2's reordered
norm, Gemma's RMSNorm sandwich): each component read through the post-norm frozen at its actual scale.

The reference is the model's own modules run with their ``hook_scale`` pinned to the cached scale — a
different code path from the ``frozen()`` linearization the attribution uses."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODEL, scale_gpt
from workbench.analysis.dla import direct_logit_attribution
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.norms.frozen import FrozenStandardize

NORMS = ("peri-ln", "post-sub", "peri-rms")


def _model(norm: str) -> GPT:
    return scale_gpt(GPT(ModelConfig(**{**TINY_MODEL, "norm": norm, "n_layers": 3, "n_heads": 4})), seed=3)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_MODEL["d_vocab"], (1, 14), generator=torch.Generator().manual_seed(seed))


def _pinned(norm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm module's own forward on ``x`` with its scale replaced by ``scale``."""
    norm.hook_scale.add_hook(lambda s, hook: scale.expand_as(s))
    try:
        return norm(x)
    finally:
        norm.hook_scale.remove_hooks("fwd")


@pytest.mark.parametrize("norm", NORMS)
@torch.no_grad()
def test_attributions_sum_to_the_logit_and_each_equals_its_pinned_scale_effect(norm):
    m, t, answer, contrast, pos = _model(norm), _tokens(), 11, 40, 9
    r = direct_logit_attribution(m, t, answer, contrast, pos=pos)
    assert abs(r.dla_sum - r.logit) <= 1e-5 * max(1.0, abs(r.logit))
    direct = m.W_U[:, answer] - m.W_U[:, contrast]
    _, cache = m.run_with_cache(t)
    final = cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][:, pos:pos + 1]
    ln_scale = cache["ln_final.hook_scale"][:, pos:pos + 1]

    def logit(resid):
        return (_pinned(m.ln_final, resid, ln_scale) * direct).sum().item()

    dla = dict(zip(r.table.name, r.table.dla))
    for l, block in enumerate(m.blocks):
        z = cache[f"blocks.{l}.attn.hook_z"][:, pos:pos + 1]  # [1, 1, head, d_head]
        raw = torch.einsum("bphd,hdm->bpm", z, block.attn.W_O) + block.attn.b_O
        s1 = cache[f"blocks.{l}.ln1_post.hook_scale"][:, pos:pos + 1]
        for h in range(m.cfg.n_heads):
            head = torch.einsum("bpd,dm->bpm", z[:, :, h], block.attn.W_O[h])
            image = _pinned(block.ln1_post, raw, s1) - _pinned(block.ln1_post, raw - head, s1)
            want = logit(final) - logit(final - image)
            assert abs(dla[f"L{l}H{h}"] - want) <= 1e-5 * max(1.0, abs(want)), (l, h)
        mlp_raw = cache[f"blocks.{l}.mlp.hook_post"][:, pos:pos + 1] @ block.mlp.W_out + block.mlp.b_out
        s2 = cache[f"blocks.{l}.ln2_post.hook_scale"][:, pos:pos + 1]
        image = _pinned(block.ln2_post, mlp_raw, s2) - _pinned(block.ln2_post, mlp_raw - (mlp_raw - block.mlp.b_out), s2)
        want = logit(final) - logit(final - image)
        assert abs(dla[f"L{l}.mlp"] - want) <= 1e-5 * max(1.0, abs(want)), l
    # with the norms live the linear reading is not the direct effect: DLA is not trivially the ablation
    assert r.nmae > 1e-3


@pytest.mark.parametrize("norm", NORMS)
@torch.no_grad()
def test_with_every_norm_frozen_attribution_is_the_direct_effect(norm):
    m = _model(norm)
    g = torch.Generator().manual_seed(5)
    for module in m.modules():
        if hasattr(module, "standardize") and not module.standardize.is_identity:
            sigma = float(torch.rand((), generator=g) * 2 + 0.5)
            module.standardize = FrozenStandardize(sigma, centers=module.standardize.centers)
    r = direct_logit_attribution(m, _tokens(1), 3, 17)
    assert abs(r.dla_sum - r.logit) <= 1e-5 * max(1.0, abs(r.logit))
    assert r.nmae <= 1e-5
    offsets = r.table[r.table.kind == "norm offset"]
    assert len(offsets) == 2 * m.cfg.n_layers
    # LayerNorm's β is a component of its own; RMSNorm has none
    assert (offsets.dla.abs().max() > 1e-3) == (norm == "peri-ln")
