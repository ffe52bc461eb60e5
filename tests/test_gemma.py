"""Gemma 2 and Gemma 3 (text) through the one model surface: tiny random checkpoints with every Gemma-specific
value away from its default (query_pre_attn_scalar ≠ head_dim, head_dim ≠ hidden/heads, GQA, rope bases ≠
10000, soft-caps that bend the logits, a window shorter than the sequences, norm weights far from 0) give
transformers' own logits, the sandwich's hook invariants hold, and what cannot take them refuses in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import workbench
from conftest import TINY_MODEL, assert_round_trips, every_analysis_runs, rel_err, scale_weights
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT

WINDOW = 7
COMMON = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, query_pre_attn_scalar=20, max_position_embeddings=64, sliding_window=WINDOW,
              rms_norm_eps=1e-5)
# Caps at a few times the typical logit: tanh bends them without saturating every one (raw attention
# logits here have median ≈ 9, output logits ≈ 3 with a maximum ≈ 25).
ATTN_CAP, FINAL_CAP = 10.0, 8.0
# float32 round-off through these far-from-linear models: 1–9e-6 of the logit scale over seeds 10–15 (the
# written-out path of run_with_cache the larger); with both models computing every step in float64 the
# difference is 1e-14, so all of it is round-off. Seed 11: ≤ 4e-6, leaving the 1e-5 tolerance a margin.
SEED = 11


def _hf_config(family: str):
    from transformers import Gemma2Config, Gemma3TextConfig

    if family == "gemma2":
        return Gemma2Config(**COMMON, num_hidden_layers=3, rope_theta=30000.0, attn_logit_softcapping=ATTN_CAP,
                            final_logit_softcapping=FINAL_CAP)
    # 5 local : 1 global in the released models; 1 : 1 here so both kinds appear twice. The global layers'
    # linear rope scaling and the local layers' own base must both be read.
    return Gemma3TextConfig(**COMMON, num_hidden_layers=4, sliding_window_pattern=2, rope_theta=300000.0,
                            rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                            final_logit_softcapping=FINAL_CAP)


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory, hf_dirs):
    """A tiny random Gemma 2 and Gemma 3 text directory, with the tests' tokenizer (that of hf_dirs)."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for family in ("gemma2", "gemma3_text"):
        d = tmp_path_factory.mktemp(family)
        torch.manual_seed(SEED)
        hf = AutoModelForCausalLM.from_config(_hf_config(family))
        scale_weights(hf, seed=SEED)  # norm weights U(0.5, 1.5): gains 1 + w in (1.5, 2.5)
        hf.save_pretrained(d)
        for f in hf_dirs["llama"].glob("tokenizer*"):
            shutil.copy(f, d / f.name)
        dirs[family] = d
    return dirs


def _tokens(n: int = 40, seed: int = 1):
    return torch.randint(0, 320, (3, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_logits_equal_transformers_before_and_after_the_cap(gemma_dirs, family):
    """Final logits and pre-cap logits equal transformers' on sequences longer than the window."""
    from transformers import AutoModelForCausalLM

    m = workbench.load(gemma_dirs[family])
    hf = AutoModelForCausalLM.from_pretrained(gemma_dirs[family]).eval()
    cfg = m.cfg
    assert cfg.family == family and cfg.norm == "peri-rms" and cfg.d_head * cfg.n_heads != cfg.d_model
    assert cfg.n_key_value_heads < cfg.n_heads and cfg.attn_scale == pytest.approx(20 ** 0.5)
    assert cfg.sliding_layers == [0, 2] and cfg.sliding_window == WINDOW and cfg.output_logits_soft_cap == FINAL_CAP
    t = _tokens()
    with torch.no_grad():
        ref = hf(input_ids=t).logits
        ref_raw = hf.lm_head(hf.model(input_ids=t).last_hidden_state)
        fused = m(t)  # the fused attention kernel where nothing is hooked and nothing capped (Gemma 3)
        ours, cache = m.run_with_cache(t)  # the written-out attention
        raw = m.unembed(m.ln_final(cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]))
    assert rel_err(raw, ref_raw) <= 1e-5 and rel_err(ours, ref) <= 1e-5 and rel_err(fused, ref) <= 1e-5
    assert ref_raw.abs().max() > 2 * FINAL_CAP  # the cap bends the largest logits
    assert (ref - ref_raw).abs().max() > 0.1 * FINAL_CAP
    # the cache's final residual reproduces the logits through ln_final, W_U and the cap
    torch.testing.assert_close(m.final_logits(cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]), ours)


def test_gemma3_reads_qk_norm_and_each_layer_kinds_rope(gemma_dirs):
    m = workbench.load(gemma_dirs["gemma3_text"])
    cfg = m.cfg
    assert cfg.qk_norm == "head" and cfg.attn_scores_soft_cap is None
    assert cfg.sliding_rotary_base == 500.0 and cfg.rotary_base == 300000.0
    assert cfg.rotary_scaling == {"rope_type": "linear", "factor": 4.0}
    local, glob = m.blocks[0].attn.rotary.inv_freq, m.blocks[1].attn.rotary.inv_freq
    torch.testing.assert_close(local, 1 / 500.0 ** (torch.arange(0, 12, 2) / 12))
    torch.testing.assert_close(glob, 1 / 300000.0 ** (torch.arange(0, 12, 2) / 12) / 4)
    w = m.blocks[0].attn.q_norm.affine.w
    assert w.min() > 1.4  # the (1 + w) gain, w ~ U(0.5, 1.5)


def test_the_sandwich_hooks_and_gemmas_weight_transforms(gemma_dirs):
    """resid_mid = resid_pre + ln1_post(Σ heads z·W_O); the embedding enters scaled by √d; ln1_post's scale
    is the RMS of the attention output; the norms' gains are 1 + w."""
    from safetensors.torch import load_file

    m = workbench.load(gemma_dirs["gemma2"])
    sd = load_file(gemma_dirs["gemma2"] / "model.safetensors")
    E = sd["model.embed_tokens.weight"]
    torch.testing.assert_close(m.W_E, E * 32 ** 0.5)
    torch.testing.assert_close(m.W_U, E.T)  # tied: the unembedding is the unscaled table
    torch.testing.assert_close(m.blocks[1].ln1_post.affine.w, 1 + sd["model.layers.1.post_attention_layernorm.weight"])
    t = _tokens(20)
    _, cache = m.run_with_cache(t)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], E[t] * 32 ** 0.5)
    for l, b in enumerate(m.blocks):
        heads = torch.einsum("bphd,hdm->bpm", cache[f"blocks.{l}.attn.hook_z"], b.attn.W_O)
        scale = (heads.pow(2).mean(-1, keepdim=True) + m.cfg.eps).sqrt()
        torch.testing.assert_close(cache[f"blocks.{l}.ln1_post.hook_scale"], scale, rtol=1e-5, atol=1e-6)
        attn_out = heads / scale * b.ln1_post.affine.w
        torch.testing.assert_close(cache[f"blocks.{l}.hook_attn_out"], attn_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], cache[f"blocks.{l}.hook_resid_pre"] + attn_out,
                                   rtol=1e-4, atol=1e-4)


def test_the_window_and_the_attention_cap_apply_where_configured(gemma_dirs):
    """Sliding layers see their last W keys, full layers every earlier one; the scores the softmax reads
    are cap·tanh(q·k / √query_pre_attn_scalar / cap)."""
    m = workbench.load(gemma_dirs["gemma2"])
    n = 30
    _, cache = m.run_with_cache(_tokens(n, seed=2))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for l in range(m.cfg.n_layers):
        seen = cache[f"blocks.{l}.attn.hook_pattern"] > 0
        allowed = (j <= i) & ((j > i - WINDOW) if l in (0, 2) else True)
        assert torch.equal(seen, allowed.expand_as(seen))
    a = m.blocks[1].attn
    q, k = cache["blocks.1.attn.hook_rot_q"], a._repeat_kv(cache["blocks.1.attn.hook_rot_k"])
    raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / 20 ** 0.5
    want = (ATTN_CAP * torch.tanh(raw / ATTN_CAP)).masked_fill(~(j <= i), float("-inf"))
    torch.testing.assert_close(cache["blocks.1.attn.hook_attn_scores"], want, rtol=1e-5, atol=1e-5)
    assert raw.abs().max() > 2 * ATTN_CAP  # the cap bends the largest scores


def test_the_config_round_trips_through_a_run_directory(gemma_dirs, tmp_path):
    assert_round_trips(workbench.load(gemma_dirs["gemma3_text"]), tmp_path / "run", _tokens(20))


def test_new_fields_default_to_the_old_model():
    """A config without the new fields is the model it was: no scale, caps or per-layer windows."""
    cfg = ModelConfig(**TINY_MODEL, pos="rope", sliding_window=5)
    assert all(cfg.sliding(l) for l in range(cfg.n_layers)) and cfg.attn_scale is None
    assert cfg.attn_scores_soft_cap is None and cfg.output_logits_soft_cap is None and cfg.sliding_rotary_base is None
    m = GPT(cfg).eval()
    assert m.blocks[0].attn.window == 5 and m.blocks[1].attn.rotary.inv_freq[1] == 1 / 10000 ** (2 / 8)


@pytest.mark.parametrize("kw,message", [
    (dict(sliding_layers=[0]), "sliding_layers=[0] must be distinct layers in [0, 2) of a model with a sliding_window"),
    (dict(sliding_window=4, sliding_layers=[2]), "sliding_layers=[2] must be distinct layers"),
    (dict(sliding_window=4, sliding_rotary_base=100.0), "sliding_rotary_base needs rotary positions"),
    (dict(attn_scale=0.0), "attn_scale must be positive"),
    (dict(output_logits_soft_cap=-1.0), "output_logits_soft_cap must be positive"),
])
def test_a_config_the_model_cannot_take_is_refused(kw, message):
    with pytest.raises(WorkbenchError, match=re.escape(message)):
        ModelConfig(**{**TINY_MODEL, **kw})


def _variant(src, tmp_path, name, **changes):
    d = tmp_path / name
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("family,changes,message", [
    ("gemma2", dict(use_bidirectional_attention=True), "Gemma 2 with use_bidirectional_attention is not supported"),
    ("gemma2", dict(hidden_activation="relu"), "Gemma 2 hidden_activation='relu' is not supported"),
    ("gemma2", dict(layer_types=["chunked_attention"] * 3), "Gemma 2 layer_types ['chunked_attention'] are not supported"),
    ("gemma2", dict(sliding_window=None), "Gemma 2 has sliding-attention layers but sliding_window=None"),
    ("gemma2", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope scaling 'yarn'"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "Gemma 3 with attn_logit_softcapping is not supported"),
    ("gemma3_text", dict(model_type="gemma3"), "model family 'gemma3' is not supported"),
])
def test_a_variant_we_cannot_represent_is_refused_in_one_line(gemma_dirs, tmp_path, capsys, family, changes, message):
    d = _variant(gemma_dirs[family], tmp_path, "variant", **changes)
    assert main(["dla", str(d), "--prompt", "And God said"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_what_cannot_take_gemma_refuses_in_one_line(gemma_dirs, tmp_path, capsys):
    g = str(gemma_dirs["gemma2"])
    for argv, message in ((["dla", g, "--prompt", "And God said"], "undefined with final logit soft-capping"),
                          (["convert", g, "--to", "folded", "--out", str(tmp_path / "conv")],
                           "convert cannot fold live norms on sub-layer outputs"),
                          (["convert", str(gemma_dirs["gemma3_text"]), "--to", "folded", "--out", str(tmp_path / "conv")],
                           "convert cannot fold QK-norm gains")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not any((tmp_path / n).exists() for n in ("conv", "hf"))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_export_round_trips_through_stock_gemma(gemma_dirs, tmp_path, family):
    """√d embedding scale divided back out, (1 + w) gains, soft-caps, query_pre_attn_scalar, per-layer windows
    and (Gemma 3) the local layers' rope base and the global layers' linear scaling, all written back."""
    from transformers import AutoModelForCausalLM

    from workbench.loader import export

    m = workbench.load(gemma_dirs[family])
    report = export(m, tmp_path / "out")
    t = _tokens()
    with torch.no_grad():
        assert rel_err(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=t).logits, m(t)) <= 1e-5
    assert report["architecture"] == {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[family]
    # a model Gemma's classes cannot compute (here: Pre-RMSNorm blocks) is refused, never written as another
    from workbench.loader.gemma import export_gemma

    m.cfg = ModelConfig(**{**m.cfg.to_dict(), "norm": "pre-rms"})
    with pytest.raises(WorkbenchError, match="not of Gemma's shape"):
        export_gemma(m, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_remove_ln_takes_every_gemma_norm_and_leaves_exact_dla(gemma_dirs, tmp_path, tiny_corpus):
    """Gemma 3: the sandwich, per-head QK-norms (one σ per head) and the final norm, all removed, on a model
    with sliding-window layers and its own local rope base; afterwards DLA is exact. Gemma 2: the same
    sites; its capped output keeps DLA undefined, but the norm-free model is what was evaluated."""
    from workbench.removal import RemovalConfig, is_norm_free, remove_ln

    small = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                 dtype="float32", control=False)
    # Gemma 3 without its final soft-cap (which alone would keep DLA undefined)
    sources = {"gemma3_text": _variant(gemma_dirs["gemma3_text"], tmp_path, "uncapped", final_logit_softcapping=None),
               "gemma2": gemma_dirs["gemma2"]}
    for family, source in sources.items():
        out = tmp_path / family
        # Gemma 3 through the recipe its gated (GeGLU) MLP chooses — the MLP norm split into up path and gate,
        # the gate's last, the one-sided MLP penalty — Gemma 2 through the plain schedule
        how = dict(options=small) if family == "gemma3_text" else dict(rc=RemovalConfig.of(**small))
        s = remove_ln(source, out, corpus=str(tiny_corpus), progress=False, **how)
        names = [e["norm"] for e in s["schedule"]]
        assert names[0] == "blocks.0.ln2_post" and ("blocks.0.attn.q_norm" in names) == (family == "gemma3_text")
        assert ("blocks.0.ln2_up" in names) == (family == "gemma3_text") and names[-1] == "special positions"
        assert s["fold_max_abs_logit_diff"] <= 1e-4 * 10
        # a stock Gemma directory, every norm an identity, read back by transformers at the summary's CE
        assert s["export"]["ln_free"] and s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)
        free = workbench.load(out)
        assert is_norm_free(free) and free.cfg.qk_norm is None and free.cfg.sliding_layers is not None
    r = direct_logit_attribution(workbench.load(tmp_path / "gemma3_text"), "And God said", " the")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit)) and r.nmae <= 1e-5


def test_dla_and_logit_attrs_refuse_a_soft_capped_output(tmp_path):
    """A Pre-norm model with capped logits: its residual is a sum, but the logits are not linear in it."""
    from workbench.loader import export

    m = GPT(ModelConfig(**TINY_MODEL, norm="pre-rms", output_logits_soft_cap=3.0)).eval()
    t = _tokens(10) % TINY_MODEL["d_vocab"]
    with pytest.raises(WorkbenchError, match=r"undefined with final logit soft-capping \(3·tanh\(logit / 3\)\)"):
        direct_logit_attribution(m, t[:1], 5)
    _, cache = m.run_with_cache(t)
    with pytest.raises(WorkbenchError, match="logit_attrs is undefined with final logit soft-capping"):
        cache.logit_attrs(cache.accumulated_resid(), tokens=t[:, -1])
    pre_ln = GPT(ModelConfig(**TINY_MODEL, attn_scores_soft_cap=5.0)).eval()
    with pytest.raises(WorkbenchError, match="GPT-2 attends to every earlier key"):
        export(pre_ln, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()


def test_the_zoo_trains_peri_rms_only_when_named():
    from workbench.zoo import parse_norms

    assert "peri-rms" not in parse_norms(None) and "peri-ln" in parse_norms(None)
    assert parse_norms("peri-rms") == ["peri-rms"]


def test_every_analysis_runs_on_gemma(gemma_dirs):
    every_analysis_runs(workbench.load(gemma_dirs["gemma2"]))
