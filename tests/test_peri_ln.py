"""Norms on sub-layer outputs — ``peri-ln`` (sandwich) and ``post-sub`` (OLMo 2's reordered norm) — against
the block written out from its own cache, and the refusals of what cannot take them yet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workbench
from conftest import TINY_MODEL, TINY_TRAIN, scale_gpt
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT


def _model(norm: str) -> GPT:
    return scale_gpt(GPT(ModelConfig(**{**TINY_MODEL, "norm": norm, "n_layers": 2})))


def _ln(x, norm):
    w, b = norm.affine.w, norm.affine.b
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def _rms(x, norm):
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.affine.w


@pytest.mark.parametrize("norm,pre,post", [("peri-ln", _ln, _ln), ("post-sub", None, _rms)])
def test_each_block_adds_its_normed_sublayer_output(norm, pre, post):
    m = _model(norm)
    t = torch.randint(0, TINY_MODEL["d_vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = m.run_with_cache(t)
        for l, b in enumerate(m.blocks):
            x = cache[f"blocks.{l}.hook_resid_pre"]
            a_in = pre(x, b.ln1) if pre else x  # post-sub: no norm on the sub-layer's input
            attn_out = post(b.attn(a_in, a_in), b.ln1_post)
            torch.testing.assert_close(cache[f"blocks.{l}.hook_attn_out"], attn_out, rtol=1e-4, atol=1e-4)
            mid = x + attn_out
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], mid, rtol=1e-4, atol=1e-4)
            m_in = pre(mid, b.ln2) if pre else mid
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_post"], mid + post(b.mlp(m_in), b.ln2_post),
                                       rtol=1e-4, atol=1e-4)
            # the heads sum to the post-norm's *input*, not to what is added
            heads = torch.einsum("bphd,hdm->bpm", cache[f"blocks.{l}.attn.hook_z"], b.attn.W_O) + b.attn.b_O
            assert (heads - attn_out).abs().max() > 1e-2
        assert cache["blocks.0.ln1_post.hook_scale"].shape == (2, 12, 1)
        torch.testing.assert_close(logits, m.unembed(m.ln_final(cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"])))


def test_the_post_norm_scale_is_a_hook_point():
    m = _model("peri-ln")
    t = torch.randint(0, TINY_MODEL["d_vocab"], (1, 10), generator=torch.Generator().manual_seed(1))
    _, clean = m.run_with_cache(t, names_filter="blocks.1.ln2_post.hook_normalized")
    seen = {}
    with m.hooks(fwd_hooks=[("blocks.1.ln2_post.hook_scale", lambda s, hook: s * 2),
                            ("blocks.1.ln2_post.hook_normalized", lambda x, hook: seen.setdefault("x", x))]):
        m(t)
    torch.testing.assert_close(seen["x"], clean["blocks.1.ln2_post.hook_normalized"] / 2)


def test_both_train_and_what_cannot_take_them_refuses_in_one_line(tmp_path, tiny_corpus, capsys):
    for norm in ("peri-ln", "post-sub"):
        workbench.train(norm, tmp_path / norm, steps=3, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False)
        m = workbench.load(tmp_path / norm)
        assert m.blocks[0].placement == "peri" and m.blocks[0].ln1_post.affine.w.requires_grad
        r = direct_logit_attribution(m, "And God said unto the", " the")  # through the frozen post-norms
        assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "peri-ln"), "--to", "folded", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "convert cannot fold live norms on sub-layer outputs" in err and "\n" not in err
    assert not (tmp_path / "c").exists()
    assert main(["export", str(tmp_path / "peri-ln"), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
