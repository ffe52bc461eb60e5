"""Results compared with an independent reference where they were once only compared with themselves:
configs as the hub writes them (legacy rotary keys) read by transformers and by us, the explicit
attention path (GQA, every per-head pattern) against transformers' eager attention, and exports that
check themselves against the stock reload and refuse a model they cannot represent."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench
from workbench.errors import WorkbenchError
from workbench.model.fold import as_norm_free

from conftest import rel_err


def _tokens(m, n=48, seed=1):
    return torch.randint(0, m.cfg.d_vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _hub_style(src, dst, drop=("rope_parameters",), **legacy):
    """A copy of the directory ``src`` whose config.json says what the hub's files say (keys of
    transformers 4 and earlier, which transformers 5 rewrites when it saves)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(legacy)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# What the real files say: Pythia (rotary_pct, rotary_emb_base), Llama 2 / SmolLM2 and Qwen2 (rope_theta at
# top level, rope_scaling null). Values differ from the defaults and from the fixtures', so a key that is
# not read changes the logits.
HUB_KEYS = {
    "gpt_neox": dict(rotary_pct=0.25, rotary_emb_base=20000),
    "llama": dict(rope_theta=100000.0, rope_scaling=None),
    "qwen2": dict(rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False, sliding_window=4096),
}


@pytest.mark.parametrize("family", sorted(HUB_KEYS))
def test_configs_as_the_hub_writes_them(hf_dirs, tmp_path, family):
    d = _hub_style(hf_dirs[family], tmp_path / family, **HUB_KEYS[family])
    m = workbench.load(d)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    rp = hf.config.rope_parameters  # transformers read the legacy keys: this is what the model must compute
    assert rp["rope_theta"] == HUB_KEYS[family].get("rope_theta", HUB_KEYS[family].get("rotary_emb_base"))
    assert m.cfg.rotary_base == rp["rope_theta"]
    assert m.cfg.rotary_dim == int(m.cfg.d_head * rp.get("partial_rotary_factor", 1.0))
    t = _tokens(m)
    with torch.no_grad():
        assert rel_err(m(t), hf(input_ids=t).logits) <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_explicit_attention_path_equals_transformers_eager(hf_dirs, family):
    """An unfiltered ``run_with_cache`` takes the explicit attention path (the pattern is materialized):
    its logits and every head's pattern equal transformers' eager attention — grouped-query attention
    included (llama and qwen2 share each K/V head between two query heads)."""
    m = workbench.load(hf_dirs[family])
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[family], attn_implementation="eager").eval()
    t = _tokens(m)
    logits, cache = m.run_with_cache(t)
    with torch.no_grad():
        ref = hf(input_ids=t, output_attentions=True)
    assert rel_err(logits, ref.logits) <= 1e-5
    assert m.cfg.n_key_value_heads < m.cfg.n_heads or family in ("gpt2", "gpt_neox")
    for l, pattern in enumerate(ref.attentions):  # [batch, head, pos, key_pos]
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], pattern, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_with_a_non_default_rotary_base_reloads_exactly(hf_dirs, tmp_path, family):
    """The fixtures' rotary base is not 10000: an exporter that forgot it writes another model."""
    from workbench.loader import export

    m = workbench.load(hf_dirs[family])
    assert m.cfg.rotary_base != 10000.0
    report = export(m, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert stock.config.rope_parameters["rope_theta"] == m.cfg.rotary_base
    t = _tokens(m, n=60, seed=5)
    with torch.no_grad():
        assert rel_err(stock(input_ids=t).logits, m(t)) <= 1e-5
    assert report["max_abs_logit_diff"] <= 1e-5 * m(t).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_refuses_a_model_it_cannot_represent_and_writes_nothing(hf_dirs, tmp_path, family, capsys):
    """A norm-free model is exported with identity norms made of ε = 1e15 (exact while mean(x²) ≪ ε). A
    residual stream of ~10⁷ breaks that: the stock reload differs, so the export refuses, nothing written."""
    from workbench.cli import main
    from workbench.loader import export

    from conftest import save_run

    m = as_norm_free(workbench.load(hf_dirs[family]), 1.0)
    with torch.no_grad():
        m.embed.W_E.mul_(1e7)
        m.unembed.W_U.mul_(1e-7)
    with pytest.raises(WorkbenchError, match="does not reproduce this model") as e:
        export(m, tmp_path / "out")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value) and "nothing was written" in str(e.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []
    run = save_run(m, tmp_path.parent / f"{tmp_path.name}-run")
    assert main(["export", str(run), "--out", str(tmp_path / "cli")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("workbench: error:")]
    assert len(err) == 1 and "does not reproduce" in err[0] and not (tmp_path / "cli").exists()
    # the same model at an ordinary scale exports, and its check passes
    ok = as_norm_free(workbench.load(hf_dirs[family]), 1.0)
    assert export(ok, tmp_path / "fine")["max_abs_logit_diff"] <= 3e-5 * ok(_tokens(ok)).abs().max().item()
