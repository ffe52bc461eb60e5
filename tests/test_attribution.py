"""DLA exactness and its error, patching invariants, confidence-neuron geometry and mechanism."""

import copy

import numpy as np
import pytest
import torch

from conftest import scale_gpt
from workbench.analysis.confidence import confidence_neurons, neuron_geometry, null_space_basis, summarize
from workbench.analysis.dla import direct_logit_attribution, residual_components
from workbench.analysis.patching import patching
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT

CFG = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=24, d_vocab=64)


def model(norm, seed=0, **kw):
    """Weights, gains, biases and running statistics far from linear (``scale_gpt``), so that the norms,
    attention and GELU matter and an attribution that is wrong shows."""
    torch.manual_seed(0)
    return scale_gpt(GPT(ModelConfig(norm=norm, **{**CFG, **kw})), seed)


def toks(seed=1, n=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, CFG["d_vocab"], (1, n), generator=g)


def true_logit_diff(m, t, a, c=None):
    logits = m(t)[0, -1]
    return (logits[a] - (logits[c] if c is not None else 0)).item()


def logit_scale(m, t):
    """The largest |logit| at the attributed position: what float32 round-off is relative to."""
    return m(t)[0, -1].abs().max().item()


@pytest.mark.parametrize("norm", ["none", "pre-ln", "lns", "pre-rms", "pre-crms", "srms", "dyt", "batchnorm",
                                  "powernorm", "unified"])
def test_dla_sums_to_the_logit(norm):
    """With the final norm's statistics frozen at the actual residual, DLA sums to the logit."""
    m = model(norm)
    t = toks()
    r = direct_logit_attribution(m, t, 5, 9)
    scale = logit_scale(m, t)
    assert abs(r.logit - true_logit_diff(m, t, 5, 9)) <= 1e-6 * scale
    assert abs(r.dla_sum - r.logit) <= 1e-6 * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm", ["none", "batchnorm", "powernorm", "unified"])
def test_dla_is_exact_when_the_final_norm_is_linear(norm, seed):
    """No norm, or batch statistics at evaluation: each component's DLA is its direct effect to 1e-6 of
    the logit scale (docs/attribution.md), and the components with the constants sum to the logit."""
    m = model(norm, seed)
    t = toks(seed=seed + 1)
    r = direct_logit_attribution(m, t, 5, 9)
    scale = logit_scale(m, t)
    assert scale > 50  # far from linear: float32 round-off is not hidden by small logits
    comps = r.table[r.table.kind != "constant"]
    assert (comps.dla - comps.direct_effect).abs().max() <= 1e-6 * scale
    assert abs(r.dla_sum - true_logit_diff(m, t, 5, 9)) <= 1e-6 * scale
    assert r.nmae <= 1e-5  # the direct effect's own round-off over the mean |DE| (see the doc)


@pytest.mark.parametrize("norm", ["pre-ln", "pre-rms", "dyt"])
def test_dla_is_approximate_with_a_live_norm(norm):
    assert direct_logit_attribution(model(norm), toks(), 5).nmae > 1e-3


def test_direct_effect_equals_removing_the_component_by_hook():
    """DE of head L1H2 = logit change when its output is subtracted from the final residual."""
    m = model("pre-ln")
    t = toks()
    r = direct_logit_attribution(m, t, 5)
    names, comps, _ = residual_components(m, t)
    c = comps[names.index("L1H2")]

    def remove(x, hook):
        x = x.clone()
        x[0, -1] -= c
        return x

    with m.hooks(fwd_hooks=[("blocks.1.hook_resid_post", remove)]):
        removed = m(t)[0, -1, 5].item()
    de = r.table.set_index("name").loc["L1H2", "direct_effect"]
    assert abs(de - (m(t)[0, -1, 5].item() - removed)) <= 1e-6 * logit_scale(m, t)


def test_dla_matches_transformerlens_logit_attrs_on_pre_ln():
    """Ours on the model = TL's ActivationCache.logit_attrs on the same model with ln_final's gain
    folded into W_U (TL's DLA assumes a folded final norm)."""
    m = model("pre-ln")
    t = toks()
    r = direct_logit_attribution(m, t, 5, 9).table.set_index("name")
    folded = copy.deepcopy(m)
    with torch.no_grad():
        folded.unembed.W_U.mul_(folded.ln_final.affine.w[:, None])
        folded.ln_final.affine.w.fill_(1.0)
    _, cache = folded.run_with_cache(t)
    parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    tl = cache.logit_attrs(parts, tokens=torch.tensor([5]), incorrect_tokens=torch.tensor([9]), pos_slice=-1)[:, 0]
    ours = {"embed": r.dla["embed"], "pos_embed": r.dla["pos_embed"]}
    for l in range(CFG["n_layers"]):
        ours[f"{l}_attn_out"] = sum(r.dla[f"L{l}H{h}"] for h in range(CFG["n_heads"])) + r.dla[f"L{l}.attn.b_O"]
        ours[f"{l}_mlp_out"] = r.dla[f"L{l}.mlp"] + r.dla[f"L{l}.mlp.b_out"]
    scale = logit_scale(m, t)
    for label, value in zip(labels, tl.tolist()):
        assert abs(ours[label] - value) <= 1e-6 * scale, label


def test_dla_refuses_post_ln_and_bad_answers():
    with pytest.raises(WorkbenchError, match="not a sum of component outputs"):
        direct_logit_attribution(model("post-ln"), toks(), 5)
    with pytest.raises(WorkbenchError, match="context is 24"):
        direct_logit_attribution(model("pre-ln"), toks(n=30), 5)


def test_patching_invariants_on_a_one_token_change():
    """Patching layer-0 residual at the changed position restores the clean metric exactly; at any
    other position nothing changes; on a norm-free model the last MLP's attribution is exact."""
    m = model("none")
    clean = toks()
    corrupt = clean.clone()
    corrupt[0, 4] = (clean[0, 4] + 7) % CFG["d_vocab"]
    r = patching(m, clean, corrupt, 5, 9)
    t = r.table
    l0 = t[(t.kind == "resid") & (t.layer == 0)].set_index("pos")
    assert l0.activation[4] == pytest.approx(r.clean_metric - r.corrupt_metric, rel=1e-5, abs=1e-4)
    assert l0.normalized[4] == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(l0.drop(index=4).activation, 0, atol=1e-6)
    assert np.allclose(l0.drop(index=4).attribution, 0, atol=1e-6)
    last_mlp = t[(t.kind == "mlp") & (t.layer == CFG["n_layers"] - 1)].iloc[0]
    assert last_mlp.attribution == pytest.approx(last_mlp.activation, rel=1e-4, abs=1e-4)
    assert -1 <= r.correlation <= 1


def test_last_layer_heads_patch_as_the_written_out_formula_and_attribution_agrees():
    """Norm-free, parallel attention + MLP: the metric is linear in the last layer's z, so patching head h
    changes it by exactly (z_clean − z_corrupt)[last, h] · W_O[h] · (W_U[:, a] − W_U[:, b]), and attribution
    patching (first order) must equal activation patching head for head."""
    m = model("none", parallel=True, n_layers=3)
    clean = toks()
    corrupt = clean.clone()
    corrupt[0, 2], corrupt[0, 6] = (clean[0, 2] + 7) % CFG["d_vocab"], (clean[0, 6] + 3) % CFG["d_vocab"]
    r = patching(m, clean, corrupt, 5, 9)
    heads = r.table[(r.table.kind == "head") & (r.table.layer == 2)].set_index("head")
    key = "blocks.2.attn.hook_z"
    with torch.no_grad():
        zc = m.run_with_cache(clean, names_filter=key)[1][key][0, -1]
        zk = m.run_with_cache(corrupt, names_filter=key)[1][key][0, -1]
        u = m.unembed.W_U[:, 5] - m.unembed.W_U[:, 9]
        formula = torch.einsum("hd,hdm,m->h", zc - zk, m.blocks[2].attn.W_O, u)
    assert formula.abs().min() > 1e-3 and len(set(formula.round(decimals=3).tolist())) == CFG["n_heads"]
    np.testing.assert_allclose(heads.activation.to_numpy(), formula.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(heads.attribution.to_numpy(), formula.numpy(), rtol=1e-4, atol=1e-4)
    last_mlp = r.table[(r.table.kind == "mlp") & (r.table.layer == 2)].iloc[0]
    assert last_mlp.attribution == pytest.approx(last_mlp.activation, rel=1e-4, abs=1e-4)


def test_patching_needs_equal_lengths():
    with pytest.raises(WorkbenchError, match="same number of tokens"):
        patching(model("pre-ln"), toks(n=8), toks(n=9), 5, 9)


def test_null_space_share_of_constructed_neurons():
    m = model("pre-ln")
    basis = null_space_basis(m, 0.25)
    with torch.no_grad():
        m.blocks[-1].mlp.W_out[0] = basis[:, 0] * 3
        m.blocks[-1].mlp.W_out[1] = m.W_U[:, 7]  # an unembedding direction: mostly outside
    geo = neuron_geometry(m, null_fraction=0.25)
    assert geo.null_share[0] == pytest.approx(1.0, abs=1e-5)
    assert geo.w_out_norm[0] == pytest.approx(3.0, abs=1e-5)
    assert geo.null_share[1] < 0.25


def test_confidence_neuron_acts_only_through_the_norm_scale():
    """A neuron writing along an exact null direction of W_U (zero-mean, so LN centering keeps it)
    changes entropy only via ln_final's scale: frozen-scale effect 0, share via scale 1. Without a
    norm the same neuron does nothing at all."""
    for norm, expected in (("pre-ln", 1.0), ("none", None)):
        m = model(norm)
        v = torch.randn(CFG["d_model"])
        v = v - v.mean()
        v = v / v.norm()
        with torch.no_grad():
            if norm == "pre-ln":
                m.ln_final.affine.w.fill_(1.0)  # so that the gain does not rotate v out of the null space
            m.unembed.W_U.sub_(torch.outer(v, v @ m.unembed.W_U))  # v is now an exact null direction
            m.blocks[-1].mlp.W_out.mul_(0.01)
            m.blocks[-1].mlp.W_out[3] = v * 20
            m.blocks[-1].mlp.b_in[3] = 2.0
        t = torch.randint(1, CFG["d_vocab"], (4, 16), generator=torch.Generator().manual_seed(3))
        df = confidence_neurons(m, t, top=3, null_fraction=1 / CFG["d_model"])
        row = df.set_index("neuron").loc[3]
        assert row.null_share == pytest.approx(1.0, abs=1e-4)
        assert abs(row.entropy_effect_frozen_scale) < 1e-5
        if expected is None:
            assert abs(row.entropy_effect) < 1e-5
        else:
            assert abs(row.entropy_effect) > 1e-3 and row.share_via_norm_scale == pytest.approx(expected, abs=1e-3)
    assert set(summarize(df)) == {"null-space candidate", "largest norm"}


def test_figures_are_built_from_the_tables():
    from workbench.analysis.figures import attribution_vs_activation, dla_bars, head_grid, resid_patching_map

    m = model("pre-ln")
    r = direct_logit_attribution(m, toks(), 5)
    bars = dla_bars(r.table, top=6)
    assert list(bars.data[0].y) == r.table.reindex(r.table.dla.abs().sort_values(ascending=False).index).dla.head(6).tolist()
    grid = head_grid(r.table)
    assert np.asarray(grid.data[0].z).shape == (CFG["n_layers"], CFG["n_heads"])
    assert grid.data[0].z[1][2] == pytest.approx(r.table.set_index("name").dla["L1H2"])
    clean = toks()
    corrupt = clean.clone()
    corrupt[0, 3] = 1
    p = patching(m, clean, corrupt, 5, 9)
    assert np.asarray(resid_patching_map(p.table).data[0].z).shape == (CFG["n_layers"], clean.shape[1])
    assert len(attribution_vs_activation(p.table).data) == 4
