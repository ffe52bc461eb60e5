"""The exact attention-sink prefix (``workbench/model/sink.py``, ``remove-ln --sink-prefix``).

References: the original model computing position 0 live (its cache for the K/V, its logits for
positions ≥ 1), stock transformers with the prefix as its cache, and the frozen norm's formula written out.
"""

import copy

import pytest
import torch
from conftest import rel_err

import workbench
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model import sink

FAMILIES = ("llama", "qwen3", "mistral", "gpt2", "gpt_neox")  # GQA + θ≠1e4, QK-norm, sliding window, learned pos, parallel
TOKEN = 5


def windows(m, n=20, seed=0):
    t = torch.randint(0, m.cfg.d_vocab, (3, n), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = TOKEN
    return t


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_keys_and_values_are_position_0s_in_the_original(hf_dirs, family):
    m = workbench.load(hf_dirs[family])
    p = sink.capture(m, TOKEN)
    rotary = m.cfg.pos == "rope"
    _, cache = m.run_with_cache(windows(m))  # a longer sequence: position 0 sees only itself
    for layer in range(m.cfg.n_layers):
        k = cache[f"blocks.{layer}.attn.hook_rot_k" if rotary else f"blocks.{layer}.attn.hook_k"][:, 0]
        v = cache[f"blocks.{layer}.attn.hook_v"][:, 0]
        assert rel_err(p.keys[layer].expand_as(k), k) <= 1e-6 and rel_err(p.values[layer].expand_as(v), v) <= 1e-6
    assert p.keys.shape == (m.cfg.n_layers, m.cfg.n_key_value_heads, m.cfg.d_head)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_behind_the_prefix_equal_a_model_computing_position_0(hf_dirs, family):
    m = workbench.load(hf_dirs[family])
    s = sink.attach(copy.deepcopy(m), sink.capture(m, TOKEN))
    t = windows(m, n=24)  # longer than Mistral's window of 7: the prefix leaves it like any key
    with torch.no_grad():
        live, behind = m(t), s(t)
    assert rel_err(behind, live) <= 1e-5
    # the hooks see positions 1, 2, …; the pattern has the prefix as key position 0
    _, cache = s.run_with_cache(t)
    assert cache["blocks.0.hook_resid_post"].shape[1] == t.shape[1] - 1
    assert cache["blocks.0.attn.hook_pattern"].shape[-2:] == (t.shape[1] - 1, t.shape[1])


@pytest.mark.parametrize("family", ("llama", "qwen3", "mistral"))
def test_stock_transformers_with_the_prefix_as_its_cache(hf_dirs, family):
    """What the docs tell a user to do with a prefix file: transformers alone, generate included."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()
    m = workbench.load(hf_dirs[family])
    p = sink.capture(m, TOKEN)
    t = windows(m, n=16)
    with torch.no_grad():
        assert rel_err(sink.stock_logits(hf, p, t), hf(input_ids=t).logits) <= 1e-5
        plain = hf.generate(t[:1], max_new_tokens=6, do_sample=False)
        cached = hf.generate(t[:1], cache=sink.stock_cache(p, hf.config), max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, cached)


def test_frozen_norm_keeps_position_0_live():
    from workbench.norms.frozen import FrozenStandardize, SpecialPositions

    pos = SpecialPositions(eot_id=None, n_first=2, sink=True)
    f = FrozenStandardize(2.5, centers=False, positions=pos, sigma_bos=7.0, live_eps=1e-5)
    x = torch.randn(2, 5, 8) * 3
    pos.update(torch.zeros(2, 5, dtype=torch.long))
    live0 = x[:, 0] / (x[:, 0].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    out = f(x, lambda s: s)  # position 0 live, position 1 its special σ, the rest the shared σ
    assert torch.allclose(out[:, 0], live0, atol=1e-6)
    assert torch.allclose(out[:, 1], x[:, 1] / 7.0, atol=1e-6) and torch.allclose(out[:, 2:], x[:, 2:] / 2.5, atol=1e-6)
    f.special = False  # the special positions handed over: position 0 stays live, the rest divide by σ
    out = f(x, lambda s: s)
    assert torch.allclose(out[:, 0], live0, atol=1e-6) and torch.allclose(out[:, 1:], x[:, 1:] / 2.5, atol=1e-6)
    with pytest.raises(WorkbenchError, match="--sink-prefix needs a LayerNorm or RMSNorm"):
        FrozenStandardize(2.5, centers=False, positions=pos, sigma_bos=7.0)


@pytest.fixture(scope="module")
def removed(hf_dirs, tmp_path_factory, tiny_corpus):
    from workbench.removal import RemovalConfig, remove_ln

    out = tmp_path_factory.mktemp("sink") / "free"
    # float32 training on every machine: the fold and export checks below are float32 rounding (1e-4 in
    # logits), which weights trained under bf16 autocast on a CPU with AMX exceeded (1.1e-4, 1.5e-4)
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          sink_prefix=True, dtype="float32")
    return out, remove_ln(hf_dirs["llama"], out, rc, corpus=str(tiny_corpus), progress=False)


def test_removal_with_a_sink_prefix_exports_a_stock_llama_and_the_prefix(removed):
    out, s = removed
    assert (out / sink.SINK_FILE).is_file() and (out / "config.json").is_file()
    assert not (out / "control" / sink.SINK_FILE).exists()  # the control computes position 0 itself
    assert s["fold_max_abs_logit_diff"] <= 1e-4 and s["export"]["max_abs_logit_diff"] <= 1e-4
    assert s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)  # transformers + the prefix cache
    back = workbench.load(out)
    assert back.sink_token == sink.read(out / sink.SINK_FILE).token and back.cfg.norm == "none"
    from workbench.analysis.dla import direct_logit_attribution

    r = direct_logit_attribution(back, "And God said unto the", " the")
    assert r.nmae <= 1e-5 and abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    assert all(row["finite"] for row in s["robustness"])


def test_dla_is_exact_at_every_position_behind_the_prefix(removed, hf_dirs):
    """The table behind issue 24's "DLA exact at positions ≥ 1": every row's logit is the model's own
    logit for the next token at that position (a plain forward), DLA sums to it, and its error is ≤ 1e-5,
    where the same table on the model with live norms is far from exact."""
    from workbench.analysis import dla_exactness

    out, _ = removed
    back = workbench.load(out)
    t = windows(back, n=12, seed=3)
    t[:, 0] = back.sink_token
    table = dla_exactness(back, t[:2])
    assert sorted(set(table.pos)) == list(range(1, 11)) and len(table) == 20 and table.finite.all()
    with torch.no_grad():
        logits = back(t[:2])
    w, pos = torch.tensor(table.window.values), torch.tensor(table.pos.values)
    ref = logits[w, pos, t[w, pos + 1]]  # the token that follows, read off the window itself
    assert torch.allclose(torch.tensor(table.logit.values, dtype=ref.dtype), ref, atol=1e-4)
    assert (table.dla_sum - table.logit).abs().max() <= 1e-4 and table.nmae.max() <= 1e-5
    live = dla_exactness(workbench.load(hf_dirs["llama"]), t[:1], [1, 6])
    assert live.nmae.min() > 1e-4
    with pytest.raises(WorkbenchError, match="position 0"):
        dla_exactness(back, t[:1], [0])
    with pytest.raises(WorkbenchError, match="no next token"):
        dla_exactness(back, t[:1], [11])


def test_the_prefix_is_position_0_of_the_model_before_folding(removed):
    """Position 0's logits in the prefix are what the exported weights give nowhere else: the sink model's
    first logits equal the stored ones, and the folded weights alone (no prefix) compute something else."""
    out, _ = removed
    back = workbench.load(out)
    p = sink.read(out / sink.SINK_FILE)
    t = back.to_tokens("And God said")
    with torch.no_grad():
        assert torch.equal(back(t)[0, 0], p.logits)
        bare = copy.deepcopy(back)
        bare.sink_token = None
        for b in bare.blocks:
            b.attn.sink_k = b.attn.sink_v = None
        assert rel_err(bare(t)[0, 1:], back(t)[0, 1:]) > 1e-3


def test_bad_prefixes_and_inputs_are_refused_in_one_line(removed, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    out, _ = removed
    back = workbench.load(out)
    t = back.to_tokens("And God said")
    t[:, 0] = (back.sink_token + 1) % back.cfg.d_vocab
    with pytest.raises(WorkbenchError, match="must start with token"):
        back(t)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    p = sink.read(out / sink.SINK_FILE)
    sink.save(sink.SinkPrefix(p.token, p.keys[:1], p.values[:1], p.logits), bad / sink.SINK_FILE)
    assert main(["dla", str(bad), "--prompt", "And God said", "--answer", " the"]) == 2
    err = capsys.readouterr().err.strip()
    assert "written for another model" in err and "\n" not in err
    save_file({"keys": p.keys}, str(bad / sink.SINK_FILE))
    assert main(["dla", str(bad), "--prompt", "And God said", "--answer", " the"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a workbench-sink-prefix-1 file" in err and "\n" not in err
    with pytest.raises(WorkbenchError, match="already attends to a sink prefix"):
        sink.capture(back, p.token)


def test_the_docs_lines_generate_with_the_prefix(removed):
    """docs/ln_removal.md's transformers-only lines, run as written on the exported directory: they
    generate what the workbench's sink model generates greedily."""
    import re

    from conftest import ROOT

    out, _ = removed
    doc = (ROOT / "docs" / "ln_removal.md").read_text()
    code = re.search(r"<!-- sink-snippet -->\n```python\n(.*?)```\n<!-- /sink-snippet -->", doc, re.S).group(1)
    scope = {"DIR": str(out)}
    exec(compile(code, "docs/ln_removal.md", "exec"), scope)  # our own docs, not a file we were given
    back = workbench.load(out)
    ids = scope["ids"]
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, back(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(scope["out"], ids)


def test_the_mlp_penalty_leaves_a_sinks_position_0_alone():
    """With a sink prefix position 0 is never divided by σ: the penalty counts every other position only."""
    import math

    from workbench.removal.losses import mlp_scale_penalty

    s = torch.tensor([20.0, 1.0, 1.0, 3.0, 9.0]).reshape(1, 5, 1)
    keep = torch.tensor([False, True, True, True, True]).reshape(1, 5, 1)
    first = torch.tensor([True, False, False, False, False]).reshape(1, 5, 1)
    sigma = math.sqrt((1 + 1 + 9 + 81) / 4)
    want = sum(max(0.0, v / sigma - 1.2) ** 2 for v in (1.0, 1.0, 3.0, 9.0)) / 4  # BOS's 20 not counted
    assert mlp_scale_penalty([s], keep, 0.2, first).item() == pytest.approx(want, rel=1e-6)
    assert mlp_scale_penalty([s], keep, 0.2).item() > want  # without the sink it is
