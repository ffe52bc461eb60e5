"""Norms on a prompt (workbench/analysis/norm_sites.py, dashboard/norms.py): every site's scale against the
statistic written out from that norm's own cached input, the logit lens against ln_final's formula applied by
hand (recomputed on each residual, or frozen at the last residual's scale), on tiny models with weights far from
linear and a non-default ε; a tiny Gemma 2 directory; the page and the command line, bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import einsum
from streamlit.testing.v1 import AppTest

import workbench
from conftest import ROOT, TINY_MODEL, save_run, scale_gpt
from workbench.analysis.norm_sites import lens_side_by_side, logit_lens, norm_scales
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT

EPS = 1e-3  # not the default 1e-5: a scale computed without the model's ε is off by ~1e-4 relative and more
PROMPT = "And God said unto Moses, Go in unto Pharaoh"  # 38 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def tok(tiny_corpus):
    from workbench.tokenizer import train_tokenizer

    return train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), TINY_MODEL["d_vocab"])


def _model(tok, norm: str, **kw) -> GPT:
    return scale_gpt(GPT(ModelConfig(**{**TINY_MODEL, "norm": norm, "eps": EPS, "n_ctx": 64, **kw}), tokenizer=tok))


def _rms(x, eps=EPS):
    return (x.pow(2).mean(-1) + eps).sqrt()


def _std(x, eps=EPS):
    return ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1) + eps).sqrt()


def _site(table, site) -> torch.Tensor:
    """One site's scales as [pos] (or [pos, head]) from the tidy table."""
    t = table[table.site == site]
    if t["head"].notna().any():
        return torch.tensor(t.pivot(index="pos", columns="head", values="scale").to_numpy(dtype=float))
    return torch.tensor(t.sort_values("pos").scale.to_numpy(dtype=float))


def _check(table, expected: dict[str, torch.Tensor]) -> None:
    assert list(dict.fromkeys(table.site)) == list(expected)
    for site, want in expected.items():
        torch.testing.assert_close(_site(table, site), want.double(), rtol=1e-5, atol=1e-7, msg=site)


def _cache(m, tokens):
    with torch.no_grad():
        return m.run_with_cache(tokens)[1]


def test_qk_norm_scales_equal_each_sites_rms_written_out(tok):
    """Pre-RMS with per-head QK-norm and grouped K/V heads: ln1/ln2 the RMS of resid_pre/resid_mid, q_norm/k_norm
    each head's RMS of its projection of ln1's output, ln_final the last residual's RMS; relative = / median."""
    m = _model(tok, "qk-norm", n_key_value_heads=2, pos="rope", rotary_base=50000.0)
    table = norm_scales(m, PROMPT)
    c = _cache(m, m.to_tokens(PROMPT))
    expected = {}
    for l, b in enumerate(m.blocks):
        x = c[f"blocks.{l}.hook_resid_pre"][0]
        ln1_out = x / _rms(x)[:, None] * b.ln1.affine.w  # what W_Q and W_K read
        expected[f"blocks.{l}.ln1"] = _rms(x)
        expected[f"blocks.{l}.ln2"] = _rms(c[f"blocks.{l}.hook_resid_mid"][0])
        expected[f"blocks.{l}.attn.q_norm"] = _rms(einsum(ln1_out, b.attn.W_Q, "p d, h d e -> p h e") + b.attn.b_Q)
        expected[f"blocks.{l}.attn.k_norm"] = _rms(einsum(ln1_out, b.attn.W_K, "p d, h d e -> p h e") + b.attn.b_K)
    expected["ln_final"] = _rms(c[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][0])
    _check(table, expected)
    assert set(table[table.kind == "k_norm"]["head"]) == {0, 1} and set(table[table.kind == "q_norm"]["head"]) == {0, 1, 2, 3}
    assert table[table.site == "ln_final"].layer.isna().all() and set(table.layer.dropna()) == {0, 1}
    assert list(table[table.site == "blocks.1.ln2"].token) == m.to_str_tokens(PROMPT) and table.skipped.isna().all()
    for (site, head), g in table.groupby(["site", "head"], dropna=False):
        np.testing.assert_allclose(g.relative, g.scale / np.median(g.scale), rtol=1e-12)


def test_peri_ln_scales_equal_each_sites_std_written_out(tok):
    """Sandwich LayerNorm: ln1_post's scale is the std of the attention output before the norm (Σ heads z·W_O + b_O),
    ln2_post's that of the MLP output (hook_post·W_out + b_out), ln1/ln2 the std of resid_pre/resid_mid."""
    m = _model(tok, "peri-ln")
    table = norm_scales(m, PROMPT)
    c = _cache(m, m.to_tokens(PROMPT))
    expected = {}
    for l, b in enumerate(m.blocks):
        attn = einsum(c[f"blocks.{l}.attn.hook_z"][0], b.attn.W_O, "p h e, h e d -> p d") + b.attn.b_O
        expected[f"blocks.{l}.ln1"] = _std(c[f"blocks.{l}.hook_resid_pre"][0])
        expected[f"blocks.{l}.ln2"] = _std(c[f"blocks.{l}.hook_resid_mid"][0])
        expected[f"blocks.{l}.ln1_post"] = _std(attn)
        expected[f"blocks.{l}.ln2_post"] = _std(c[f"blocks.{l}.mlp.hook_post"][0] @ b.mlp.W_out + b.mlp.b_out)
    expected["ln_final"] = _std(c[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][0])
    _check(table, expected)
    assert set(table.kind) == {"ln1", "ln2", "ln1_post", "ln2_post", "ln_final"} and table["head"].isna().all()


def test_identity_sites_are_left_out_and_a_constant_scale_is_skipped_with_its_reason(tok):
    """post-sub: its pre-norms are identities (no rows); a norm frozen to one σ mid-removal gets one row saying why;
    a model with no per-token site at all (DyT, none) is refused in one line."""
    from workbench.norms.frozen import FrozenStandardize

    m = _model(tok, "post-sub")
    m.blocks[1].ln2_post.standardize = FrozenStandardize(2.5, centers=False)
    table = norm_scales(m, PROMPT)
    assert not (table.kind.isin(["ln1", "ln2"])).any()
    skipped = table[table.skipped.notna()]
    assert list(skipped.site) == ["blocks.1.ln2_post"] and "[1, 1, 1]" in skipped.skipped.iloc[0]
    assert skipped.pos.isna().all() and skipped.scale.isna().all()
    c = _cache(m, m.to_tokens(PROMPT))
    attn = einsum(c["blocks.1.attn.hook_z"][0], m.blocks[1].attn.W_O, "p h e, h e d -> p d") + m.blocks[1].attn.b_O
    torch.testing.assert_close(_site(table, "blocks.1.ln1_post"), _rms(attn).double(), rtol=1e-5, atol=1e-7)
    for norm, message in (("dyt", "use one constant for every token"), ("none", "every norm site is the identity"),
                          ("batchnorm", "one scale per feature")):
        with pytest.raises(WorkbenchError, match="no norm site of this model") as e:
            norm_scales(_model(tok, norm), PROMPT)
        assert message in str(e.value) and "\n" not in str(e.value)


def _lens_reference(m, tokens, resid, scale_from, cap=None):
    """ln_final (LayerNorm) written out on ``resid`` with the std of ``scale_from``, then W_U, b_U and the cap."""
    centred = resid - resid.mean(-1, keepdim=True)
    logits = (centred / _std(scale_from)[:, None] * m.ln_final.affine.w + m.ln_final.affine.b) @ m.W_U + m.b_U
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _assert_lens(rows, logits, tokens, answer):
    logp = logits.double().log_softmax(-1)
    np.testing.assert_array_equal(rows.top_token_id, logits.argmax(-1))
    np.testing.assert_allclose(rows.top_prob, logp.max(-1).values.exp(), rtol=1e-5)
    np.testing.assert_allclose(rows.ce_next[:-1], F.cross_entropy(logits[:-1].double(), tokens[1:], reduction="none"),
                               rtol=1e-5)
    assert np.isnan(rows.ce_next.iloc[-1])
    np.testing.assert_allclose(rows.answer_logprob, logp[:, answer], rtol=1e-5)
    np.testing.assert_array_equal(rows.answer_rank, (logits > logits[:, answer:answer + 1]).sum(-1))


@pytest.mark.parametrize("cap", [None, 3.0])
def test_logit_lens_recomputed_and_frozen_equal_ln_final_written_out(tok, cap):
    """Every layer: ``recomputed`` = ln_final's LayerNorm on that residual's own std, ``frozen`` = on the last
    residual's std (centred on its own mean), each with W_U, b_U and the soft-cap; at the last layer both equal
    the model's own logits, earlier they differ."""
    m = _model(tok, "pre-ln", n_layers=3, output_logits_soft_cap=cap)
    tokens = m.to_tokens(PROMPT)[0]
    answer = m.to_single_token(" the")
    table = logit_lens(m, PROMPT, " the")
    c = _cache(m, tokens[None])
    resids = [c["blocks.0.hook_resid_pre"][0]] + [c[f"blocks.{l}.hook_resid_post"][0] for l in range(3)]
    assert set(table.method) == {"recomputed", "frozen"} and sorted(set(table.layer)) == [0, 1, 2, 3]
    assert list(table[(table.layer == 0) & (table.method == "frozen")].token) == m.to_str_tokens(PROMPT)
    with torch.no_grad():
        own = m(tokens[None])[0]
        for layer, x in enumerate(resids):
            rows = {meth: table[(table.layer == layer) & (table.method == meth)].sort_values("pos")
                    for meth in ("recomputed", "frozen")}
            _assert_lens(rows["recomputed"], _lens_reference(m, tokens, x, x, cap), tokens, answer)
            _assert_lens(rows["frozen"], _lens_reference(m, tokens, x, resids[-1], cap), tokens, answer)
            if layer < 3:  # the residual's scale grows with depth here: dividing by the last one is another lens
                assert np.abs(rows["frozen"].top_prob.to_numpy() - rows["recomputed"].top_prob.to_numpy()).max() > 1e-3
        _assert_lens(rows["recomputed"], own, tokens, answer)
    wide = lens_side_by_side(table)  # the last position, both methods beside each other
    last = table[table.pos == len(tokens) - 1]
    for meth in ("recomputed", "frozen"):
        np.testing.assert_array_equal(wide[f"{meth} top_prob"], last[last.method == meth].sort_values("layer").top_prob)
    assert not [c for c in wide if "ce_next" in c]


def test_logit_lens_is_recomputed_only_where_ln_final_has_no_per_token_scale(tok):
    for norm in ("dyt", "none", "post-ln"):
        m = _model(tok, norm)
        table = logit_lens(m, PROMPT)
        assert set(table.method) == {"recomputed"} and "answer_rank" not in table, norm
        last = table[table.layer == m.cfg.n_layers].sort_values("pos")
        with torch.no_grad():
            np.testing.assert_allclose(last.top_prob, m(m.to_tokens(PROMPT))[0].softmax(-1).max(-1).values, rtol=1e-5)


# --- a tiny Gemma 2 directory --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_dir(gemma2_dir):
    return gemma2_dir


def test_gemma2_post_norm_sites_and_a_soft_capped_lens(gemma_dir):
    """ln1_post / ln2_post rows with the RMS of the sub-layer's output before them; the lens at the last layer is
    the model's own (soft-capped) prediction both ways."""
    m = workbench.load(gemma_dir)
    table = norm_scales(m, PROMPT)
    c = _cache(m, m.to_tokens(PROMPT))
    eps = m.cfg.eps
    assert set(table.kind) == {"ln1", "ln2", "ln1_post", "ln2_post", "ln_final"} and len(set(table.site)) == 13
    for l, b in enumerate(m.blocks):
        attn = einsum(c[f"blocks.{l}.attn.hook_z"][0], b.attn.W_O, "p h e, h e d -> p d") + b.attn.b_O
        mlp = c[f"blocks.{l}.mlp.hook_post"][0] @ b.mlp.W_out + b.mlp.b_out
        for site, x in (("ln1", c[f"blocks.{l}.hook_resid_pre"][0]), ("ln1_post", attn), ("ln2_post", mlp)):
            torch.testing.assert_close(_site(table, f"blocks.{l}.{site}"), _rms(x, eps).double(), rtol=1e-5, atol=1e-7)
    assert (table.relative > 0).all() and table.scale.notna().all()
    lens = logit_lens(m, PROMPT)
    last = {meth: lens[(lens.layer == 3) & (lens.method == meth)].sort_values("pos") for meth in ("recomputed", "frozen")}
    with torch.no_grad():
        own = m(m.to_tokens(PROMPT))[0].softmax(-1).max(-1).values
    for rows in last.values():
        np.testing.assert_allclose(rows.top_prob, own, rtol=1e-5)
    assert lens.top_prob.between(0, 1).all()


# --- the page and the command line ---------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path, tok):
    return save_run(_model(tok, "qk-norm"), tmp_path / "qk")


def _page(tmp_path, monkeypatch, model: str | None = None) -> AppTest:
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("WORKBENCH_ZOO", str(tmp_path / "no-zoo"))
    monkeypatch.syspath_prepend(str(ROOT))
    at = AppTest.from_file(str(ROOT / "dashboard" / "norms.py"), default_timeout=120)
    if model is not None:
        at.query_params["model"] = model
    at.run()
    assert not at.exception, at.exception
    return at


def _clean(at) -> None:
    assert not at.exception and not at.error and not at.warning, ([e.value for e in at.error], at.warning)


def _charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_page_draws_every_site_kind_and_both_lenses(tmp_path, monkeypatch, run_dir, gemma_dir):
    at = _page(tmp_path, monkeypatch, str(run_dir))
    _clean(at)
    titles = [c["layout"]["title"]["text"] for c in _charts(at)]
    assert [t.split(":")[0] for t in titles[:5]] == ["ln1", "ln2", "q_norm", "k_norm", "ln_final"]
    assert titles[5:] == ["Logit lens, ln_final recomputed: top prob", "Logit lens, ln_final frozen: top prob"]
    at.text_input(key="norms_answer").set_value(" the").run()
    at.radio(key="norms_lens_value").set_value("answer_rank").run()
    _clean(at)
    assert _charts(at)[-1]["layout"]["title"]["text"].endswith("answer rank")

    at = _page(tmp_path, monkeypatch, str(gemma_dir))
    _clean(at)
    kinds = [c["layout"]["title"]["text"].split(":")[0] for c in _charts(at)[:-2]]
    assert sorted(kinds) == ["ln1", "ln1_post", "ln2", "ln2_post", "ln_final"]


def test_page_on_a_model_without_per_token_norms_says_so(tmp_path, monkeypatch, tok):
    at = _page(tmp_path, monkeypatch, str(save_run(_model(tok, "dyt"), tmp_path / "dyt")))
    _clean(at)
    assert "no norm site of this model" in at.info[0].value and "frozen lens needs" in at.info[1].value
    assert len(at.get("plotly_chart")) == 1


@pytest.mark.parametrize("what,value,message", [
    ("spec", "no-such-model", "unknown model spec"),
    ("prompt", "   ", "the prompt is empty"),
    ("answer", " Pharaoh Moses", "not one"),
])
def test_page_bad_input_is_one_line(tmp_path, monkeypatch, run_dir, what, value, message):
    at = _page(tmp_path, monkeypatch, value if what == "spec" else str(run_dir))
    if what != "spec":
        at.text_input(key=f"norms_{what}").set_value(value).run()
    assert not at.exception and not at.warning
    assert at.error and message in at.error[0].value and "\n" not in at.error[0].value


def test_cli_prints_the_table_and_refuses_bad_input_in_one_line(run_dir, tok, tmp_path, capsys):
    assert main(["norm-scales", str(run_dir), "--prompt", PROMPT, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ref = norm_scales(workbench.load(run_dir), PROMPT)
    assert len(rows) == len(ref) and [r["site"] for r in rows] == list(ref.site)
    np.testing.assert_allclose([r["scale"] for r in rows], ref.scale, rtol=1e-12)
    assert main(["norm-scales", str(run_dir), "--prompt", PROMPT]) == 0
    assert "blocks.1.attn.q_norm H3" in capsys.readouterr().out
    for argv, message in ((["no-such-model", "--prompt", PROMPT], "unknown model spec"),
                          ([str(run_dir), "--prompt", ""], "the prompt is empty"),
                          ([str(save_run(_model(tok, "none"), tmp_path / "none")), "--prompt", PROMPT],
                           "every norm site is the identity")):
        assert main(["norm-scales", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
