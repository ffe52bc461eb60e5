"""Every analysis that takes a model and tokens, on a model behind an attention-sink prefix (model/sink.py).

Such a model's hooks see positions 1, 2, … only (the cache's position axis is one shorter than the tokens),
so an analysis that indexes the cache by token position is off by one there. The reference: the same model
computing position 0 live, from which the prefix was captured — its logits and activations at positions ≥ 1
are the sink model's, and at position 0 its logits are the stored ones. Positions are token positions in
both; what position 0 cannot answer is refused in one line.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from conftest import rel_err

import workbench
from workbench.errors import WorkbenchError
from workbench.model import sink

PROMPT = "And God said unto Moses, Go in"


@pytest.fixture(scope="module")
def pair(hf_dirs):
    """(live, behind): a tiny Llama (RMSNorm, rotary, GQA) and a copy attending to its position 0 as a prefix."""
    live = workbench.load(hf_dirs["llama"]).eval()
    behind = sink.attach(copy.deepcopy(live), sink.capture(live, live.bos_token_id)).eval()
    assert torch.equal(live.to_tokens(PROMPT), behind.to_tokens(PROMPT))
    return live, behind


def windows(m, b=3, n=12, seed=0):
    t = torch.randint(0, m.cfg.d_vocab, (b, n), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = m.bos_token_id
    return t


def test_the_fixture_is_a_sink_model(pair):
    live, behind = pair
    t = live.to_tokens(PROMPT)
    with torch.no_grad():
        assert rel_err(behind(t), live(t)) <= 1e-5
    _, cache = behind.run_with_cache(t)
    assert cache["blocks.0.hook_resid_pre"].shape[1] == t.shape[1] - 1


# --- direct logit attribution ---------------------------------------------------------------------------------

def test_dla_at_every_token_position_is_the_live_models(pair):
    from workbench.analysis.dla import direct_logit_attribution

    live, behind = pair
    t = live.to_tokens(PROMPT)
    for pos in (1, 3, -2, -1):
        want, got = (direct_logit_attribution(m, t, " the", " and", pos=pos) for m in (live, behind))
        assert got.logit == pytest.approx(want.logit, rel=1e-5, abs=1e-5)
        assert list(got.table.name) == list(want.table.name)
        assert got.table.dla.to_numpy() == pytest.approx(want.table.dla.to_numpy(), rel=1e-4, abs=1e-5)
    for pos in (0, -t.shape[1]):
        with pytest.raises(WorkbenchError, match="at position .* is undefined: position 0 of this model is a fixed "
                                                 "attention-sink prefix.*pick a position ≥ 1"):
            direct_logit_attribution(behind, t, " the", pos=pos)
    with pytest.raises(WorkbenchError, match="outside the prompt's"):
        direct_logit_attribution(behind, t, " the", pos=t.shape[1])


# --- activation and attribution patching ---------------------------------------------------------------------

def test_patching_reports_token_positions_and_equals_the_live_model(pair):
    from workbench.analysis.figures import resid_patching_map
    from workbench.analysis.patching import patching

    live, behind = pair
    clean = live.to_tokens("And God said unto the")
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 7) % live.cfg.d_vocab
    want, got = (patching(m, clean, corrupt, " the", " and") for m in (live, behind))
    assert got.clean_metric == pytest.approx(want.clean_metric, rel=1e-5)
    keys = ["kind", "layer", "pos", "head"]
    assert got.table[keys].astype(str).equals(want.table[keys].astype(str))
    for col in ("activation", "attribution"):
        assert got.table[col].to_numpy() == pytest.approx(want.table[col].to_numpy(), abs=1e-4)
    resid0 = got.table[(got.table.kind == "resid") & (got.table.layer == 0)]
    assert list(resid0.pos) == list(range(clean.shape[1]))  # position 0: the prefix, which patching cannot move
    assert resid0[resid0.pos == 3].activation.item() == pytest.approx(got.clean_metric - got.corrupt_metric, abs=1e-4)
    assert (resid0[resid0.pos == 0][["activation", "attribution"]] == 0).all(axis=None)
    labels = list(resid_patching_map(got.table, behind.to_str_tokens(clean[0])).data[0].x)
    assert labels[3] == f"3: {behind.to_str_tokens(clean[0])[3]!r}"
    only = clean[:, :1]
    with pytest.raises(WorkbenchError, match="needs at least 2 .*attention-sink prefix"):
        patching(behind, only, only, " the", " and")


# --- norms on a prompt: scales and the logit lens -----------------------------------------------------------

def test_norm_scales_are_the_live_models_at_positions_from_1(pair):
    from workbench.analysis.norm_sites import norm_scales

    live, behind = pair
    want, got = norm_scales(live, PROMPT), norm_scales(behind, PROMPT)
    assert got.skipped.isna().all() and 0 not in set(got.pos)  # position 0's norms ran when the prefix was captured
    keys = ["site", "head", "pos"]
    merged = got.merge(want, on=keys, suffixes=("", "_live"), how="left", validate="one_to_one")
    assert len(merged) == len(want[want.pos >= 1]) and (merged.token == merged.token_live).all()
    assert merged.scale.to_numpy() == pytest.approx(merged.scale_live.to_numpy(), rel=1e-5)
    # relative: against the median over the positions the table has
    live1 = want[want.pos >= 1]
    median = live1.groupby(["site", "head"], dropna=False).scale.transform("median")
    assert got.relative.to_numpy() == pytest.approx((live1.scale / median).to_numpy(), rel=1e-5)
    with pytest.raises(WorkbenchError, match=r"has 2 token\(s\); the norm-scale table needs at least 3 \(position 0 of "
                                             r"this model is a fixed attention-sink prefix"):
        norm_scales(behind, live.to_tokens(PROMPT)[:, :2])


def test_the_logit_lens_is_the_live_models_at_positions_from_1(pair):
    from workbench.analysis.norm_sites import lens_side_by_side, logit_lens

    live, behind = pair
    want, got = logit_lens(live, PROMPT, " the"), logit_lens(behind, PROMPT, " the")
    assert set(got.method) == {"recomputed", "frozen"} and 0 not in set(got.pos)
    want = want[want.pos >= 1].reset_index(drop=True)
    exact = ["layer", "resid", "pos", "token", "next_token", "method", "top_token_id", "answer_rank"]
    assert got[exact].astype(str).equals(want[exact].astype(str))
    for col in ("top_prob", "ce_next", "answer_logprob"):
        assert got[col].to_numpy() == pytest.approx(want[col].to_numpy(), rel=1e-4, abs=1e-6, nan_ok=True)
    n = int(got.pos.max()) + 1
    for pos in (-1, 1):
        pd.testing.assert_frame_equal(lens_side_by_side(got, pos), lens_side_by_side(want, pos), rtol=1e-4)
    for pos in (0, -n):
        with pytest.raises(WorkbenchError, match="has no position .*covers positions 1–.*attention-sink prefix"):
            lens_side_by_side(got, pos)
    with pytest.raises(WorkbenchError, match=r"the logit lens needs at least 2 \(position 0"):
        logit_lens(behind, live.to_tokens(PROMPT)[:, :1])


# --- depth diagnostics ------------------------------------------------------------------------------------------

def test_residual_statistics_count_positions_from_1(pair):
    from workbench.analysis.depth import residual_statistics

    live, behind = pair
    batches = [windows(live, seed=s) for s in range(2)]
    want, got = residual_statistics(live, batches, far=2), residual_statistics(behind, batches, far=2)
    assert got["n_tokens"] == want["n_tokens"]
    for w, g in zip(want["layers"], got["layers"]):
        for key in ("resid_var_pos1", "resid_rms_pos1"):
            assert g[key] == pytest.approx(w[key], rel=1e-5)
        # over every position means position 0 too, which a sink model does not compute
        assert g["resid_var"] is None and g["resid_rms"] is None
        assert all(d["max_abs_first"] is None for d in g["massive_dims"])
    for n, values in want["angular_distance"].items():  # the last position
        assert got["angular_distance"][n] == pytest.approx(values, rel=1e-4, abs=1e-6)


def test_a_massive_dimension_at_position_1_is_not_taken_for_position_0(pair):
    from workbench.analysis.depth import residual_statistics

    _, behind = pair
    t = windows(behind)

    def plant(x, hook):  # token position 1 is the hooks' first entry
        x = x.clone()
        x[:, 0, 5] = 1e4
        return x

    with behind.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", plant)]):
        r = residual_statistics(behind, [t], far=1)
    dims = r["layers"][0]["massive_dims"]
    assert dims and dims[0]["dim"] == 5 and dims[0]["max_abs_rest"] == pytest.approx(1e4)


def test_skipping_a_block_behind_the_prefix_skips_it_at_positions_from_1(pair):
    """The prefix is a constant: a skipped block changes positions ≥ 1 only. The reference is the live model
    with the block skipped at those positions (position 0, which sees only itself, then stays as it was)."""
    from workbench.analysis.depth import skip_block_delta_ce

    live, behind = pair
    batches = [windows(live, seed=s) for s in range(2)]
    base, deltas = skip_block_delta_ce(behind, batches)
    for l, delta in enumerate(deltas):
        saved = {}
        hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook: saved.__setitem__("x", x)),
                 (f"blocks.{l}.hook_resid_post", lambda x, hook: torch.cat([x[:, :1], saved["x"][:, 1:]], 1))]
        with torch.no_grad(), live.hooks(fwd_hooks=hooks):
            ce = sum(live(t, return_type="loss").item() for t in batches) / len(batches)
        with torch.no_grad():
            ce0 = sum(live(t, return_type="loss").item() for t in batches) / len(batches)
        assert base == pytest.approx(ce0, rel=1e-5) and delta == pytest.approx(ce - ce0, rel=1e-4, abs=1e-5)


# --- layer-ablation studies ------------------------------------------------------------------------------------

def test_study_means_are_over_the_positions_the_hooks_see(pair):
    from workbench.analysis.study import _evaluate, _hooks, _sublayer_means

    live, behind = pair
    batches = [windows(live, seed=s) for s in range(2)]
    means = _sublayer_means(behind, batches)
    names = set(means)
    acts = {n: [] for n in names}
    for t in batches:
        _, cache = live.run_with_cache(t, names_filter=lambda n: n in names)
        for n in names:
            acts[n].append(cache[n][:, 1:])
    for n in names:
        assert rel_err(means[n], torch.cat(acts[n]).mean((0, 1))) <= 1e-5, n
    # a mean ablation behind the prefix is the live model's at positions ≥ 1
    with torch.no_grad():
        base = [behind(t).log_softmax(-1)[:, :-1] for t in batches]
        got = _evaluate(behind, batches, _hooks("mean", [1], means), base)
        ref = [(n, lambda x, hook, m=means[n]: torch.cat([x[:, :1], m.expand_as(x[:, 1:])], 1))
               for n in ("blocks.1.hook_attn_out", "blocks.1.hook_mlp_out")]
        want = _evaluate(live, batches, ref, base)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


# --- prompts and confidence neurons -------------------------------------------------------------------------------

def test_prompt_accuracy_and_an_empty_prompt_answered_by_the_prefix(pair):
    from workbench.analysis.prompts import Prompt, prompt_accuracy

    live, behind = pair
    prompts = [Prompt("said", "test", "And God said unto the", " the", " and"),
               Prompt("empty", "test", "", " the", " and")]  # only the sink token: the stored logits answer
    want, got = prompt_accuracy(live, prompts), prompt_accuracy(behind, prompts)
    assert list(got.name) == ["said", "empty"] and list(got.answer_rank) == list(want.answer_rank)
    assert got.logit_diff.to_numpy() == pytest.approx(want.logit_diff.to_numpy(), rel=1e-5, abs=1e-6)


def test_confidence_neurons_ablate_the_positions_the_model_computes(pair):
    """Position 0 is the prefix: not ablated, not in the mean activation, its (stored) logits' entropy the same in
    every run. The reference: the live model ablated at positions ≥ 1 with their mean activation."""
    from workbench.analysis.confidence import confidence_neurons

    def entropy(logits):  # mean over every position and sequence, position 0's stored logits included
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1).mean()

    live, behind = pair
    t = windows(live, n=10)
    got = confidence_neurons(behind, t, top=2)
    post, scale = f"blocks.{live.cfg.n_layers - 1}.mlp.hook_post", "ln_final.hook_scale"
    with torch.no_grad():
        logits, cache = live.run_with_cache(t, names_filter=lambda n: n in (post, scale))
        mean = cache[post][:, 1:].mean((0, 1))
        for r in got.itertuples():
            def ablate(x, hook, n=r.neuron):
                x = x.clone()
                x[:, 1:, n] = mean[n]
                return x

            with live.hooks(fwd_hooks=[(post, ablate)]):
                total = (entropy(live(t)) - entropy(logits)).item()
            with live.hooks(fwd_hooks=[(post, ablate), (scale, lambda x, hook: cache[scale])]):
                frozen = (entropy(live(t)) - entropy(logits)).item()
            assert r.mean_activation == pytest.approx(mean[r.neuron].item(), rel=1e-5, abs=1e-6)
            assert r.entropy_effect == pytest.approx(total, rel=1e-3, abs=1e-6)
            assert r.entropy_effect_frozen_scale == pytest.approx(frozen, rel=1e-3, abs=1e-6)
