"""OLMo-2 through the one model surface: tiny random checkpoints with every value away from its default
(rope base ≠ 10000, 4 heads / 2 K/V heads, q/k/v/o biases, rms_norm_eps ≠ 1e-5 and 1e-6, weights and norm
gains far from linear) give transformers' own logits; the whole-projection QK-norm and the post-sub-layer
norms agree with the cache written out by hand; DLA reads every component through the frozen post-norms;
what cannot take the model (convert, export, config variants we cannot represent) refuses in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from einops import einsum

import workbench
from conftest import TINY_MODEL, assert_round_trips, every_analysis_runs, rel_err, scale_weights
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT

EPS = 3e-5
COMMON = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=EPS)
# "olmo2": biases on q, k, v and o, untied; "olmo2-tied": no biases, tied embeddings, linear rope scaling.
VARIANTS = {"olmo2": dict(attention_bias=True, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
            "olmo2-tied": dict(attention_bias=False, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 70000.0})}
SEED = 7


@pytest.fixture(scope="module")
def olmo2_dirs(tmp_path_factory, hf_dirs):
    """Tiny random OLMo-2 directories (weights N(0, 0.35²), every gain U(0.5, 1.5)) with the tests' tokenizer."""
    from transformers import AutoModelForCausalLM, Olmo2Config

    dirs = {}
    for name, kw in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        torch.manual_seed(SEED)
        hf = AutoModelForCausalLM.from_config(Olmo2Config(**COMMON, **kw, eos_token_id=0, pad_token_id=0))
        scale_weights(hf, seed=SEED)
        hf.save_pretrained(d)
        for f in hf_dirs["llama"].glob("tokenizer*"):
            shutil.copy(f, d / f.name)
        dirs[name] = d
    return dirs


def _tokens(n: int = 40, seed: int = 1):
    return torch.randint(0, 320, (3, n), generator=torch.Generator().manual_seed(seed))


def _hf(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(olmo2_dirs, variant):
    """Fused and written-out paths alike: ≤ 1e-5 of the logit scale (measured in float32: 0 through the fused
    path, ≤ 9e-7 through run_with_cache's written-out attention)."""
    m, hf = workbench.load(olmo2_dirs[variant]), _hf(olmo2_dirs[variant])
    cfg = m.cfg
    assert (cfg.family, cfg.norm, cfg.qk_norm, cfg.eps) == ("olmo2", "post-sub", "proj", EPS)
    assert cfg.n_key_value_heads == 2 < cfg.n_heads and cfg.qkv_bias == cfg.o_bias == (variant == "olmo2")
    assert cfg.rotary_base == VARIANTS[variant]["rope_parameters"]["rope_theta"] and not cfg.mlp_bias
    assert cfg.rotary_scaling == ({} if variant == "olmo2" else {"rope_type": "linear", "factor": 2.0})
    t = _tokens()
    with torch.no_grad():
        ref = hf(input_ids=t).logits
        fused = m(t)
        ours, _ = m.run_with_cache(t)
    assert rel_err(fused, ref) <= 1e-5 and rel_err(ours, ref) <= 1e-5
    assert ref.abs().max() > 1.0


def test_the_qk_norm_is_one_rms_over_the_whole_projection(olmo2_dirs):
    """q_norm / k_norm's hook_scale is sqrt(mean over every head and dim of (x W + b)² + ε), one per token —
    not per head —, hook_q / hook_k are the projection divided by it times the gain, and they equal what
    transformers' own q_norm / k_norm return."""
    m, hf = workbench.load(olmo2_dirs["olmo2"]), _hf(olmo2_dirs["olmo2"])
    t = _tokens(30)
    seen = {}
    handles = [getattr(hf.model.layers[1].self_attn, f"{x}_norm").register_forward_hook(
        lambda mod, args, out, x=x: seen.setdefault(x, out)) for x in ("q", "k")]
    with torch.no_grad():
        hf(input_ids=t)
    for h in handles:
        h.remove()
    _, cache = m.run_with_cache(t)
    a = m.blocks[1].attn
    x = cache["blocks.1.hook_resid_pre"]  # no norm on the attention's input
    for name, W, b, norm in (("q", a.W_Q, a.b_Q, a.q_norm), ("k", a.W_K, a.b_K, a.k_norm)):
        raw = einsum(x, W, "b p d, h d e -> b p h e") + b
        n_heads = W.shape[0]
        scale = (raw.pow(2).sum((-2, -1)) / (n_heads * m.cfg.d_head) + EPS).sqrt()[..., None]  # [batch, pos, 1]
        got = cache[f"blocks.1.attn.{name}_norm.hook_scale"]
        assert got.shape == (*t.shape, 1) and norm.affine.w.shape == (n_heads * m.cfg.d_head,)
        torch.testing.assert_close(got, scale, rtol=1e-5, atol=1e-6)
        per_head = (raw.pow(2).mean(-1) + EPS).sqrt()
        assert (per_head / scale - 1).abs().max() > 0.1  # the heads' own RMS differ: the test can tell them apart
        want = raw / scale[..., None] * norm.affine.w.reshape(n_heads, m.cfg.d_head)
        torch.testing.assert_close(cache[f"blocks.1.attn.hook_{name}"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[f"blocks.1.attn.hook_{name}"].flatten(-2), seen[name], rtol=1e-5, atol=1e-5)
    assert (a.q_norm.affine.w - 1).abs().max() > 0.3  # gains far from 1


def test_the_q_norm_scale_is_a_hook_point_that_changes_the_logits(olmo2_dirs):
    m = workbench.load(olmo2_dirs["olmo2"])
    t = _tokens(20)
    clean, cache = m.run_with_cache(t, names_filter="blocks.0.attn.q_norm.hook_normalized")
    seen = {}
    with m.hooks(fwd_hooks=[("blocks.0.attn.q_norm.hook_scale", lambda s, hook: s * 2),
                            ("blocks.0.attn.q_norm.hook_normalized", lambda x, hook: seen.setdefault("x", x))]):
        edited = m(t)
    assert cache["blocks.0.attn.q_norm.hook_normalized"].shape == (*t.shape, m.cfg.n_heads * m.cfg.d_head)
    torch.testing.assert_close(seen["x"], cache["blocks.0.attn.q_norm.hook_normalized"] / 2)
    assert (edited - clean).abs().max() > 1e-3 * clean.abs().max()  # the attention pattern moved


def test_each_sub_layer_output_is_normed_before_the_residual_add(olmo2_dirs):
    """resid_mid = resid_pre + ln1_post(Σ heads z·W_O + b_O), resid_post = resid_mid + ln2_post(mlp(resid_mid)),
    with each post-norm's scale the RMS of its input; ln1 / ln2 are identities (scale 1)."""
    m = workbench.load(olmo2_dirs["olmo2"])
    _, cache = m.run_with_cache(_tokens(25, seed=3))

    def rms_norm(v, norm):
        return v / (v.pow(2).mean(-1, keepdim=True) + EPS).sqrt() * norm.affine.w

    for l, b in enumerate(m.blocks):
        pre, mid, post = (cache[f"blocks.{l}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        assert (cache[f"blocks.{l}.ln1.hook_scale"] == 1).all() and (cache[f"blocks.{l}.ln2.hook_scale"] == 1).all()
        heads = einsum(cache[f"blocks.{l}.attn.hook_z"], b.attn.W_O, "b p h e, h e d -> b p d") + b.attn.b_O
        torch.testing.assert_close(cache[f"blocks.{l}.ln1_post.hook_scale"],
                                   (heads.pow(2).mean(-1, keepdim=True) + EPS).sqrt(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mid, pre + rms_norm(heads, b.ln1_post), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache[f"blocks.{l}.hook_attn_out"], mid - pre, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(post, mid + rms_norm(b.mlp(mid), b.ln2_post), rtol=1e-4, atol=1e-4)
        assert (heads - cache[f"blocks.{l}.hook_attn_out"]).abs().max() > 1e-2  # the norm is not the identity
        assert cache[f"blocks.{l}.mlp.hook_pre"].std() > 1.0  # far from linear


def test_the_config_round_trips_through_a_run_directory(olmo2_dirs, tmp_path):
    assert_round_trips(workbench.load(olmo2_dirs["olmo2"]), tmp_path / "run", _tokens(20))


def test_a_whole_projection_qk_norm_is_a_capability_of_any_model():
    """qk_norm="proj" on a Pre-RMSNorm GPT with grouped-query attention: q/k norms as wide as the projections."""
    cfg = ModelConfig(**{**TINY_MODEL, "norm": "pre-rms", "pos": "rope", "n_key_value_heads": 2, "qk_norm": "proj"})
    attn = GPT(cfg).blocks[0].attn
    assert attn.q_norm.affine.w.shape == (cfg.n_heads * cfg.d_head,)
    assert attn.k_norm.affine.w.shape == (2 * cfg.d_head,)
    with pytest.raises(WorkbenchError, match=re.escape("qk_norm 'layer' is not supported (supported: head, proj")):
        ModelConfig(**{**TINY_MODEL, "qk_norm": "layer"})


def _variant(src, tmp_path, **changes):
    d = tmp_path / "variant"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes,message", [
    (dict(sliding_window=8), "OLMo-2 with sliding-window attention or other layer types is not supported"),
    (dict(layer_types=["sliding_attention", "full_attention", "full_attention"]), "OLMo-2 with sliding-window"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "OLMo-2 with a partial rotary factor (4 of 8 dims) is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(model_type="olmo3"), "model family 'olmo3' is not supported"),
])
def test_a_variant_we_cannot_represent_is_refused_in_one_line(olmo2_dirs, tmp_path, capsys, changes, message):
    d = _variant(olmo2_dirs["olmo2"], tmp_path, **changes)
    assert main(["dla", str(d), "--prompt", "And God said"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_dla_through_the_frozen_post_norms_sums_to_the_logit_and_the_cli_agrees(olmo2_dirs, capsys):
    m = workbench.load(olmo2_dirs["olmo2"])
    r = direct_logit_attribution(m, "And God said unto the", " the", " and")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit)) and r.nmae > 1e-4
    argv = ["dla", str(olmo2_dirs["olmo2"]), "--prompt", "And God said unto the", "--answer", " the",
            "--contrast", " and"]
    assert main([*argv, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["logit"] == pytest.approx(r.logit, abs=1e-6) and cli["nmae"] == pytest.approx(r.nmae, rel=1e-6)


def test_what_cannot_take_olmo2_refuses_in_one_line(olmo2_dirs, tmp_path, capsys):
    o = str(olmo2_dirs["olmo2"])
    assert main(["convert", o, "--to", "folded", "--out", str(tmp_path / "conv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "convert cannot fold QK-norm gains" in err and "\n" not in err and not (tmp_path / "conv").exists()
    # a Pre-RMSNorm model is not of OLMo-2's shape: the exporter refuses it rather than write another model
    from workbench.loader.olmo2 import export_olmo2

    m = workbench.load(olmo2_dirs["olmo2"])
    m.cfg = ModelConfig(**{**m.cfg.to_dict(), "norm": "pre-rms", "qk_norm": None})
    with pytest.raises(WorkbenchError, match="not of OLMo-2's shape"):
        export_olmo2(m, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_round_trips_through_stock_olmo2(olmo2_dirs, tmp_path):
    from workbench.loader import export

    m = workbench.load(olmo2_dirs["olmo2"])
    report = export(m, tmp_path / "out")
    t = _tokens()
    with torch.no_grad():
        assert rel_err(_hf(tmp_path / "out")(input_ids=t).logits, m(t)) <= 1e-5
    assert report["architecture"] == "Olmo2ForCausalLM" and not report["ln_free"]
    # rope scaling is not written back (the released OLMo-2 models have none): refused, never dropped
    with pytest.raises(WorkbenchError, match="not of OLMo-2's shape"):
        export(workbench.load(olmo2_dirs["olmo2-tied"]), tmp_path / "tied")
    assert not (tmp_path / "tied").exists()


def test_every_analysis_runs_on_olmo2(olmo2_dirs):
    every_analysis_runs(workbench.load(olmo2_dirs["olmo2"]))


def test_remove_ln_takes_the_output_norms_and_the_whole_projection_qk_norms(olmo2_dirs, tmp_path, tiny_corpus):
    """Every OLMo-2 norm (ln1_post, ln2_post, the q/k norms over the whole projection, the final norm) frozen
    and folded; the norm-free model is what was evaluated, and its DLA equals the direct effect."""
    from workbench.removal import RemovalConfig, is_norm_free, remove_ln

    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          dtype="float32", control=False)
    d = next(iter(olmo2_dirs.values()))
    s = remove_ln(d, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    names = [e["norm"] for e in s["schedule"]]
    assert "blocks.0.attn.k_norm" in names and not any(n.endswith((".ln1", ".ln2")) for n in names)
    assert s["fold_max_abs_logit_diff"] <= 1e-3
    # a stock OLMo-2 directory, every norm an identity, reloaded by transformers at the summary's CE
    assert s["export"]["architecture"] == "Olmo2ForCausalLM" and s["export"]["ln_free"]  # verified on reload
    assert s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)
    free = workbench.load(tmp_path / "free")
    assert is_norm_free(free) and free.cfg.qk_norm is None and free.cfg.norm == "none"
    r = direct_logit_attribution(free, "And God said", " the")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit)) and r.nmae <= 1e-5
