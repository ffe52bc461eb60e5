"""The hooked model family: reference equality, block placement, hook names, TL ActivationCache."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err, scale_gpt
from plain_gpt import plain_from_workbench
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT
from workbench.norms import scheme_names

CFG = dict(n_layers=3, d_model=32, n_heads=4, n_ctx=16, d_vocab=97)


def model(norm, **kw):
    """Every weight, gain, bias and running statistic far from its init, so that attention, GELU and the
    norms are nonlinear and wrong wiring (or a GELU variant swapped) shows in the logits."""
    torch.manual_seed(0)
    return scale_gpt(GPT(ModelConfig(norm=norm, **{**CFG, **kw})))


def tokens(batch=2, pos=12):
    return torch.randint(0, CFG["d_vocab"], (batch, pos))


def test_pre_ln_equals_independent_plain_pytorch_gpt():
    """Same weights, same logits as a nanoGPT-style model written without workbench (tanh GELU)."""
    m = model("pre-ln")
    plain = plain_from_workbench(m).eval()
    t = tokens()
    with torch.no_grad():
        ref = plain(t)
        assert rel_err(m(t), ref) <= 1e-6
    _, cache = m.run_with_cache(t)
    assert cache["blocks.0.mlp.hook_pre"].abs().max() > 3  # where exact and tanh GELU differ


def test_explicit_attention_equals_fused_kernel():
    """Hooking the pattern switches to explicit attention; the logits must not change."""
    m = model("pre-ln")
    t = tokens()
    fast = m(t)
    seen = []
    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: seen.append(p))]):
        slow = m(t)
    assert rel_err(slow, fast) <= 1e-5
    p = seen[0]
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert torch.all(p.triu(1) == 0), "attention must be causal"


def test_post_ln_block_formula():
    """post-ln block: x' = LN1(x + attn(x)); out = LN2(x' + mlp(x'))."""
    m = model("post-ln")
    b = m.blocks[1]
    x = torch.randn(2, 7, CFG["d_model"])
    def ln(mod, v):
        return F.layer_norm(v, (v.shape[-1],), mod.affine.w, mod.affine.b, 1e-5)
    mid = ln(b.ln1, x + b.attn(x, x))
    assert rel_err(b(x), ln(b.ln2, mid + b.mlp(mid))) <= 1e-6
    assert type(m.ln_final.standardize).__name__ == "IdentityStandardize"


@pytest.mark.parametrize("n_layers,alpha,n_post", [(8, 0.25, 2), (4, 0.25, 1), (3, 0.25, 0), (4, 0.5, 2), (4, 1.0, 4)])
def test_mix_ln_placement(n_layers, alpha, n_post):
    """mix-ln: Post-LN in the first floor(alpha L) blocks, Pre-LN after."""
    m = GPT(ModelConfig(norm="mix-ln", **{**CFG, "n_layers": n_layers}, norm_kwargs={"alpha": alpha}))
    assert [b.placement for b in m.blocks] == ["post"] * n_post + ["pre"] * (n_layers - n_post)
    assert n_post == math.floor(alpha * n_layers)


def test_pre_block_formula_and_separable_v_path():
    """pre-ln block: x + attn(LN1(x)) then + mlp(LN2(.)); with split_ln1_v, V reads its own ln1_v."""
    m = model("pre-ln", split_ln1_v=True)
    b = m.blocks[0]
    with torch.no_grad():
        b.ln1_v.affine.w.mul_(3.0)
    x = torch.randn(2, 7, CFG["d_model"])
    mid = x + b.attn(b.ln1(x), b.ln1_v(x))
    assert rel_err(b(x), mid + b.mlp(b.ln2(mid))) <= 1e-6
    assert not torch.allclose(b.attn(b.ln1(x), b.ln1_v(x)), b.attn(b.ln1(x), b.ln1(x)))


REQUIRED_HOOKS = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"] + [
    f"blocks.{{l}}.{h}" for h in (
        "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
        "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "attn.hook_attn_scores",
        "mlp.hook_pre", "mlp.hook_post")
]


@pytest.mark.parametrize("norm", scheme_names())
def test_every_norm_has_transformerlens_hooks_and_they_fire(norm):
    m = model(norm)
    names = {h.format(l=l) for h in REQUIRED_HOOKS for l in range(CFG["n_layers"])}
    assert names <= set(m.hook_dict)
    _, cache = m.run_with_cache(tokens())
    assert names <= set(cache.keys())
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 12, 12)
    assert cache["blocks.1.hook_resid_post"].shape == (2, 12, 32)


@pytest.mark.parametrize("norm", ["pre-ln", "pre-rms", "lns", "none"])
def test_tl_decompose_resid_sums_to_final_residual(norm):
    """TL's decompose_resid: embed + pos_embed + every attn/mlp output = final resid_post."""
    m = model(norm)
    _, cache = m.run_with_cache(tokens())
    parts = cache.decompose_resid(layer=-1, apply_ln=False)
    assert parts.shape[0] == 2 + 2 * CFG["n_layers"]
    assert rel_err(parts.sum(0), cache["blocks.2.hook_resid_post"]) <= 1e-6
    acc = cache.accumulated_resid(layer=-1)
    torch.testing.assert_close(acc[-1], cache["blocks.2.hook_resid_post"])


def test_tl_apply_ln_on_pre_ln_equals_final_normalized_residual():
    """Centered, scaled components summed = what ln_final actually normalized (its hook_normalized)."""
    m = model("pre-ln")
    _, cache = m.run_with_cache(tokens())
    parts = cache.decompose_resid(layer=-1, apply_ln=True)
    assert rel_err(parts.sum(0), cache["ln_final.hook_normalized"]) <= 1e-6


def test_tl_logit_attrs_sum_to_logit_on_norm_free_model():
    """On `none`, DLA is exact: attributions of all components + b_U = the logit."""
    m = model("none")
    t = tokens(batch=1)
    logits, cache = m.run_with_cache(t)
    parts = cache.decompose_resid(layer=-1, pos_slice=-1)
    answer = torch.tensor([5])
    attrs = cache.logit_attrs(parts, tokens=answer, pos_slice=-1)
    assert (attrs.sum(0) + m.b_U[5] - logits[:, -1, 5]).abs().item() <= 1e-6 * logits[0, -1].abs().max().item()


def test_accumulated_bias_matches_sum_of_output_biases():
    m = model("pre-ln")
    expected = m.blocks[0].attn.b_O + m.blocks[0].mlp.b_out + m.blocks[1].attn.b_O
    torch.testing.assert_close(m.accumulated_bias(1, mlp_input=True), expected)


@pytest.mark.parametrize("norm", ["post-ln", "mix-ln"])
def test_tl_decompositions_refused_when_residual_is_not_a_sum(norm):
    m = model(norm, n_layers=4)
    _, cache = m.run_with_cache(tokens())
    for call in (lambda: cache.decompose_resid(), lambda: cache.accumulated_resid(),
                 lambda: cache.logit_attrs(torch.zeros(1, 2, 12, 32), tokens=torch.tensor([1, 2]))):
        with pytest.raises(WorkbenchError, match="not a sum of component outputs"):
            call()


@pytest.mark.parametrize("norm", ["dyt", "batchnorm", "powernorm", "unified"])
def test_tl_apply_ln_refused_when_norm_is_not_a_per_token_scale(norm):
    m = model(norm)
    _, cache = m.run_with_cache(tokens())
    cache.decompose_resid(apply_ln=False)  # a sum still: allowed
    with pytest.raises(WorkbenchError, match="per-token scale"):
        cache.decompose_resid(apply_ln=True)
    with pytest.raises(WorkbenchError, match="per-token scale"):
        cache.accumulated_resid(-1, False, True)  # apply_ln given positionally


def test_context_longer_than_model_is_a_clear_error():
    with pytest.raises(WorkbenchError, match="context is 16"):
        model("pre-ln")(tokens(pos=17))


def test_loss_is_next_token_cross_entropy():
    m = model("pre-ln")
    t = tokens()
    logits = m(t)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, CFG["d_vocab"]), t[:, 1:].reshape(-1))
    torch.testing.assert_close(m(t, return_type="loss"), expected)


def test_swiglu_rope_member_trains_and_attributes_exactly(tmp_path, tiny_corpus, capsys):
    """`train --mlp swiglu --pos rope`: a gated MLP (hook_pre = gate, hook_pre_linear = up path) with rotary
    positions; DLA sums to the logit, and LayerNorm removal folds into W_gate and W_in exactly."""
    import workbench
    from workbench.analysis.dla import direct_logit_attribution
    from workbench.cli import main
    from workbench.removal import RemovalConfig, remove_ln

    run = tmp_path / "run"
    assert main(["train", "--norm", "pre-rms", "--mlp", "swiglu", "--pos", "rope", "--steps", "4", "--corpus",
                 str(tiny_corpus), "--n-ctx", "32", "--out", str(run), "--quiet"]) == 0
    m = workbench.load(run)
    assert (m.cfg.mlp, m.cfg.pos, m.cfg.act_fn) == ("swiglu", "rope", "silu") and not hasattr(m, "pos_embed")
    t = m.to_tokens("And God said unto the")
    _, cache = m.run_with_cache(t)
    mlp = m.blocks[0].mlp
    ln2 = cache["blocks.0.ln2.hook_normalized"] * m.blocks[0].ln2.affine.w
    gate, up = ln2 @ mlp.W_gate + mlp.b_gate, ln2 @ mlp.W_in + mlp.b_in
    assert torch.allclose(cache["blocks.0.mlp.hook_pre"], gate, atol=1e-5)
    assert torch.allclose(cache["blocks.0.mlp.hook_pre_linear"], up, atol=1e-5)
    assert torch.allclose(cache["blocks.0.mlp.hook_post"], torch.nn.functional.silu(gate) * up, atol=1e-5)
    r = direct_logit_attribution(m, "And God said unto the", " the")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       control=False)
    s = remove_ln(run, tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert s["fold_max_abs_logit_diff"] <= 1e-4
    free = workbench.load(tmp_path / "free")
    assert free.cfg.norm == "none" and free.cfg.mlp == "swiglu"
    assert direct_logit_attribution(free, "And God said unto the", " the").nmae <= 1e-5
    with pytest.raises(SystemExit) as e:  # argparse: one line, exit 2
        main(["train", "--norm", "pre-rms", "--mlp", "relu", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "invalid choice: 'relu'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
