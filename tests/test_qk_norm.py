"""QK-norm (per-head RMSNorm on queries and keys): the zoo member ``qk-norm`` and the Qwen3 family, against
direct computations from the cache and transformers' own model (tests/test_families.py covers the logits,
hook invariants, DLA and every analysis for the tiny Qwen3 of tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from einops import einsum

import workbench
from conftest import TINY_MODEL, TINY_TRAIN, scale_gpt
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT


def test_the_scale_is_each_heads_rms_of_its_projection(hf_dirs):
    m = workbench.load(hf_dirs["qwen3"])
    assert m.cfg.qk_norm == "head" and m.cfg.d_head == 12 and not m.cfg.qkv_bias
    t = m.to_tokens(["And God said unto Moses, Go in unto Pharaoh"])
    _, cache = m.run_with_cache(t)
    a = m.blocks[1].attn
    x = cache["blocks.1.ln1.hook_normalized"] * m.blocks[1].ln1.affine.w  # what W_Q and W_K read
    for name, W, b, norm in (("q", a.W_Q, a.b_Q, a.q_norm), ("k", a.W_K, a.b_K, a.k_norm)):
        raw = einsum(x, W, "b p d, h d e -> b p h e") + b
        scale = (raw.pow(2).mean(-1, keepdim=True) + m.cfg.eps).sqrt()
        got = cache[f"blocks.1.attn.{name}_norm.hook_scale"]
        assert got.shape == (*t.shape, W.shape[0], 1)
        torch.testing.assert_close(got, scale, rtol=1e-5, atol=1e-6)
        # hook_q / hook_k: the normalized query/key, before the rotary embedding
        torch.testing.assert_close(cache[f"blocks.1.attn.hook_{name}"], raw / scale * norm.affine.w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.q_norm.affine.w, torch.ones_like(a.q_norm.affine.w))  # gains far from 1


def test_the_q_norm_scale_is_a_hook_point_that_changes_the_output(hf_dirs):
    m = workbench.load(hf_dirs["qwen3"])
    t = m.to_tokens(["In the beginning God created the heaven and the earth"])
    clean, cache = m.run_with_cache(t, names_filter="blocks.0.attn.q_norm.hook_normalized")
    seen = {}
    with m.hooks(fwd_hooks=[("blocks.0.attn.q_norm.hook_scale", lambda s, hook: s * 2),
                            ("blocks.0.attn.q_norm.hook_normalized", lambda x, hook: seen.setdefault("x", x))]):
        edited = m(t)
    torch.testing.assert_close(seen["x"], cache["blocks.0.attn.q_norm.hook_normalized"] / 2)
    assert (edited - clean).abs().max() > 1e-3 * clean.abs().max()  # the attention pattern moved


def test_the_zoo_member_trains_saves_and_reloads(tmp_path, tiny_corpus):
    run = tmp_path / "qk"
    workbench.train("qk-norm", run, steps=3, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    m = workbench.load(run)
    assert m.cfg.norm == "qk-norm" and m.cfg.qk_norm == "head"
    assert json.loads((run / "config.json").read_text())["model"]["qk_norm"] == "head"
    moved = m.blocks[0].attn.q_norm.affine.w
    assert not torch.equal(moved, torch.ones_like(moved))  # the q-norm gain is trained
    # a config without QK-norm is another model: same weights minus the q/k norms → other logits
    plain = scale_gpt(GPT(ModelConfig(**{**TINY_MODEL, "norm": "pre-rms"})))
    qk = scale_gpt(GPT(ModelConfig(**{**TINY_MODEL, "norm": "qk-norm"})))
    t = torch.randint(0, TINY_MODEL["d_vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(t) - qk(t)).abs().max() > 1e-2


@pytest.mark.parametrize("kw,message", [
    (dict(norm="pre-rms", qk_norm="layer"), "qk_norm 'layer' is not supported (supported: head, proj"),
    (dict(norm="qk-norm", qk_norm="proj"), "norm 'qk-norm' has QK-norm 'head'; qk_norm='proj' contradicts it"),
])
def test_a_qk_norm_we_cannot_represent_is_refused(kw, message):
    with pytest.raises(WorkbenchError, match=message.replace("(", r"\(")):
        ModelConfig(**{**TINY_MODEL, **kw})


def test_qwen3_variants_and_folding_a_live_qk_norm_are_refused_in_one_line(hf_dirs, tmp_path, capsys):
    import shutil

    d = tmp_path / "qwen3-sw"
    shutil.copytree(hf_dirs["qwen3"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=8)
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["dla", str(d), "--prompt", "And God said"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Qwen3 with sliding-window attention is not supported" in err and "\n" not in err
    assert main(["convert", str(hf_dirs["qwen3"]), "--to", "folded", "--out", str(tmp_path / "conv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "convert cannot fold QK-norm gains" in err and "\n" not in err and not (tmp_path / "conv").exists()


def test_qwen3_exports_to_stock_qwen3_live_and_after_removal(hf_dirs, tmp_path, tiny_corpus):
    """A live Qwen3 round-trips through a stock Qwen3ForCausalLM directory; its removal (QK-norms included,
    one σ per head) is written as one too — q/k norms as identities — and read back norm-free, DLA exact."""
    from transformers import Qwen3ForCausalLM

    from workbench.analysis.dla import direct_logit_attribution
    from workbench.loader import export
    from workbench.removal import RemovalConfig, is_norm_free, remove_ln

    m = workbench.load(hf_dirs["qwen3"])
    report = export(m, tmp_path / "live")
    stock = Qwen3ForCausalLM.from_pretrained(tmp_path / "live").eval()
    t = torch.randint(0, m.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (stock(input_ids=t).logits - m(t)).abs().max().item() <= 1e-4 * m(t).abs().max().item()
    assert report["architecture"] == "Qwen3ForCausalLM" and not report["ln_free"]

    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          dtype="float32", control=False)
    s = remove_ln(hf_dirs["qwen3"], tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert any(e["norm"].endswith("attn.q_norm") and isinstance(e["sigma"], list) for e in s["schedule"])
    assert s["export"]["architecture"] == "Qwen3ForCausalLM" and s["export"]["max_abs_logit_diff"] <= 1e-4
    assert s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)
    back = workbench.load(tmp_path / "free")
    assert is_norm_free(back) and back.cfg.qk_norm is None
    r = direct_logit_attribution(back, "And God said", " the")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit)) and r.nmae <= 1e-5
