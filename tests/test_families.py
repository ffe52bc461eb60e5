"""One surface for every family: a tiny random Hugging Face model of each supported family (weights far
from linear) loads into the workbench's hooked GPT with transformers' logits, the TransformerLens hook
invariants, exact DLA sums, and every analysis running on it from Python as from the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench
from workbench.analysis.dla import direct_logit_attribution
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.surface import HookedModel

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "qwen3", "mistral"]
PROMPT = "And God said unto the"


def text_tokens(m):
    return m.to_tokens(["And God said unto Moses, Go in unto Pharaoh", "In the beginning God created the heaven"])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(hf_dirs, family):
    m = workbench.load(hf_dirs[family])
    assert isinstance(m, HookedModel) and m.cfg.family == family
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()
    t = torch.randint(0, m.cfg.d_vocab, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(input_ids=t).logits, m(t)
    # float32 round-off is ≤ 4e-7 of the logit scale here; exact GELU in place of tanh GELU (or back) ~2e-4
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert ref.abs().max().item() > 1.0  # not a degenerate near-zero model


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_invariants(hf_dirs, family):
    m = workbench.load(hf_dirs[family])
    t = text_tokens(m)
    _, cache = m.run_with_cache(t)
    cfg = m.cfg
    assert cache["blocks.0.attn.hook_z"].shape[-2:] == (cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape[-2] == cfg.n_key_value_heads
    emb = cache["hook_embed"] + (cache["hook_pos_embed"] if cfg.pos == "learned" else 0)
    assert torch.allclose(cache["blocks.0.hook_resid_pre"], emb)
    for l, block in enumerate(m.blocks):
        pre, mid, post = (cache[f"blocks.{l}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        attn_out, mlp_out = cache[f"blocks.{l}.hook_attn_out"], cache[f"blocks.{l}.hook_mlp_out"]
        tol = 1e-5 * post.abs().max().item()
        assert (mid - pre - attn_out).abs().max() <= tol and (post - mid - mlp_out).abs().max() <= tol
        heads = torch.einsum("bphd,hdm->bpm", cache[f"blocks.{l}.attn.hook_z"], block.attn.W_O) + block.attn.b_O
        assert (heads - attn_out).abs().max() <= tol
        # ln2 reads the block input in parallel blocks (GPT-NeoX), resid_mid otherwise; its scale is the
        # per-token std (LayerNorm) or root mean square (RMSNorm) of that input.
        x = pre if cfg.parallel else mid
        x = x - x.mean(-1, keepdim=True) if block.ln2.standardize.centers else x
        scale = (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
        assert torch.allclose(cache[f"blocks.{l}.ln2.hook_scale"], scale, rtol=1e-5)
        # far from linear: MLP pre-activations well outside the activation's linear range
        assert cache[f"blocks.{l}.mlp.hook_pre"].std() > 1.0
    if l + 1 < cfg.n_layers:
        raise AssertionError("not every block checked")


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_scale_can_be_replaced_and_frozen(hf_dirs, family):
    """The final norm's scale is a hook point: doubling it halves the normalized residual exactly."""
    m = workbench.load(hf_dirs[family])
    t = text_tokens(m)
    _, clean = m.run_with_cache(t, names_filter="ln_final.hook_normalized")
    seen = {}
    with m.hooks(fwd_hooks=[("ln_final.hook_scale", lambda s, hook: s * 2),
                            ("ln_final.hook_normalized", lambda x, hook: seen.setdefault("x", x))]):
        m(t)
    assert torch.allclose(seen["x"], clean["ln_final.hook_normalized"] / 2, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_sums_to_the_logit_and_the_cli_agrees(hf_dirs, family, capsys):
    m = workbench.load(hf_dirs[family])
    r = direct_logit_attribution(m, PROMPT, " the", " and")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    assert r.nmae > 1e-4  # a live norm: DLA approximates the direct effect
    names = r.table.name.tolist()
    assert ("pos_embed" in names) == (family == "gpt2") and f"L1H{m.cfg.n_heads - 1}" in names
    assert main(["dla", str(hf_dirs[family]), "--prompt", PROMPT, "--answer", " the", "--contrast", " and", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["logit"] == pytest.approx(r.logit, abs=1e-6) and cli["nmae"] == pytest.approx(r.nmae, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_analysis_runs_on_the_surface(hf_dirs, family, capsys):
    from workbench.analysis.confidence import confidence_neurons
    from workbench.analysis.depth import diagnose
    from workbench.analysis.patching import patching
    from workbench.languages.ranker import rank_languages

    m = workbench.load(hf_dirs[family])
    clean = m.to_tokens(PROMPT)
    changed = 3
    corrupt = clean.clone()
    corrupt[0, changed] = (clean[0, changed] + 7) % m.cfg.d_vocab
    r = patching(m, clean, corrupt, " the", " and")
    resid0 = r.table[(r.table.kind == "resid") & (r.table.layer == 0)]
    # Patching the first layer's input at the one changed position restores the clean run exactly.
    assert resid0[resid0.pos == changed].activation.item() == pytest.approx(r.clean_metric - r.corrupt_metric, abs=1e-4)
    assert resid0[resid0.pos != changed].activation.abs().max() <= 1e-4
    c = confidence_neurons(m, torch.randint(0, m.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert len(c) == 10 and c.null_share.between(0, 1).all()
    d = diagnose(m, corpus="english", tokens=256, grad_batches=1)
    assert len(d["residual"]["layers"]) == m.cfg.n_layers + 1 and d["val_ce"] > 0
    ranked = rank_languages(m, "udhr", ["fra", "spa"], max_units=3, progress=False)
    assert {x["code"] for x in ranked["languages"]} == {"fra", "spa"}
    text = PROMPT
    assert main(["patch", str(hf_dirs[family]), "--clean", text, "--corrupt", text, "--answer", " the",
                 "--contrast", " and", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    same = patching(m, text, text, " the", " and")
    assert out["clean_metric"] == pytest.approx(same.clean_metric, abs=1e-5)


def test_convert_folded_on_gpt_neox_and_refused_on_rmsnorm(hf_dirs, tmp_path):
    """`convert --to folded` where the family allows it (LayerNorm: GPT-NeoX, parallel blocks and rotary
    included): the written run, reloaded, has the original's logits on fresh tokens."""
    from workbench.removal.api import convert_to_dir

    convert_to_dir(str(hf_dirs["gpt_neox"]), "folded", tmp_path / "folded")
    src, out = workbench.load(hf_dirs["gpt_neox"]), workbench.load(tmp_path / "folded")
    t = torch.randint(0, src.cfg.d_vocab, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (src(t) - out(t)).abs().max().item() <= 1e-4 * src(t).abs().max().item()
    assert out.cfg.norm_kwargs == {"affine": False} and out.cfg.parallel
    with pytest.raises(WorkbenchError, match="convert needs a Pre-LN model"):
        convert_to_dir(str(hf_dirs["llama"]), "folded", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_unsupported_family_is_refused_in_one_line(tmp_path, hf_dirs, capsys):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(WorkbenchError, match="supported families: gpt2, llama, qwen2, qwen3, mistral, gpt_neox"):
        workbench.load(d)
    assert main(["dla", str(d), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: model family 'bert' is not supported") and "\n" not in err
    # a supported family whose config lacks a field it needs: one line naming the field
    import shutil

    broken = tmp_path / "llama-broken"
    shutil.copytree(hf_dirs["llama"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    assert main(["dla", str(broken), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is incomplete: it has no 'hidden_size'") and "\n" not in err


def test_llama_removal_writes_a_stock_llama_with_exact_dla(hf_dirs, tmp_path, tiny_corpus):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from workbench.batches import load_token_data
    from workbench.loader.family import LN_FREE_EPS
    from workbench.model.gpt import lm_cross_entropy
    from workbench.removal import RemovalConfig, is_norm_free, remove_ln

    # float32 training on every machine: the fold and export checks below are float32 rounding (1e-4 in
    # logits), which weights trained under bf16 autocast on a CPU with AMX exceeded (1.1e-4, 1.5e-4)
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          dtype="float32")
    s = remove_ln(hf_dirs["llama"], tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    assert s["family"] == "llama" and s["n_ctx"] == 64 and s["fold_max_abs_logit_diff"] <= 1e-4
    assert [e["norm"] for e in s["schedule"]][-2:] == ["ln_final", "special positions"]
    free = LlamaForCausalLM.from_pretrained(tmp_path / "free").eval()  # stock transformers, no custom code
    assert free.config.rms_norm_eps == LN_FREE_EPS and not free.config.tie_word_embeddings
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "free").backend_tokenizer
    data = load_token_data(str(tiny_corpus), tok.get_vocab_size(), tokenizer=tok)
    with torch.no_grad():  # the export's claim: within 1e-4 of the logit scale on its check tokens (float32)
        scale = free(input_ids=data.val_batches(2, 4, 64)[0][:2]).logits.abs().max().item()
        assert s["export"]["max_abs_logit_diff"] <= 1e-4 * scale
        ce = [lm_cross_entropy(free(input_ids=b).logits, b).item() for b in data.val_batches(2, 4, 64)]
    assert sum(ce) / len(ce) == pytest.approx(s["ce_ln_free"], abs=1e-4)
    assert s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)  # the summary reports the reload
    # Read back through the surface, the stock directory is norm-free again: DLA exact.
    back = workbench.load(tmp_path / "free")
    assert is_norm_free(back) and back.cfg.norm == "none"
    before = direct_logit_attribution(workbench.load(hf_dirs["llama"]), PROMPT, " the")
    after = direct_logit_attribution(back, PROMPT, " the")
    for r in (before, after):
        assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit))
    assert after.nmae <= 1e-5 < 1e-3 < before.nmae
    control = workbench.load(tmp_path / "free" / "control")  # a workbench run of the Llama family
    assert control.cfg.family == "llama" and control.cfg.norm == "pre-rms"


def test_qwen2_export_round_trip(hf_dirs, tmp_path):
    from transformers import Qwen2ForCausalLM

    from workbench.loader import export

    m = workbench.load(hf_dirs["qwen2"])
    report = export(m, tmp_path / "out")
    stock = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    t = torch.randint(0, m.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (stock(input_ids=t).logits - m(t)).abs().max().item() <= 1e-4 * m(t).abs().max().item()
    assert report["architecture"] == "Qwen2ForCausalLM"


def test_gpt_neox_removal_writes_a_workbench_run(hf_dirs, tmp_path, tiny_corpus):
    from workbench.loader import export
    from workbench.removal import RemovalConfig, is_norm_free, remove_ln

    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                       control=False)
    s = remove_ln(hf_dirs["gpt_neox"], tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False)
    free = workbench.load(tmp_path / "free")
    assert is_norm_free(free) and free.cfg.parallel and free.cfg.family == "gpt_neox" and s["fold_max_abs_logit_diff"] <= 1e-4
    # the saved run computes what was evaluated: LayerNorm's β folded into a bias GPT-NeoX lacks (b_U)
    # must survive the save
    from workbench.batches import load_token_data
    from workbench.model.gpt import lm_cross_entropy

    data = load_token_data(str(tiny_corpus), free.cfg.d_vocab, tokenizer=free.tokenizer)
    with torch.no_grad():
        ce = [lm_cross_entropy(free(b), b).item() for b in data.val_batches(2, 4, s["n_ctx"])]
    assert sum(ce) / len(ce) == pytest.approx(s["ce_ln_free"], abs=1e-4) and free.b_U.abs().max() > 0
    assert "ce_stock_reload" not in s  # a workbench run, not a stock directory
    r = direct_logit_attribution(free, PROMPT, " the")
    assert r.nmae <= 1e-5
    with pytest.raises(WorkbenchError, match="gpt_neox family has no exporter"):
        export(free, tmp_path / "hf")


def _write_tiny_gguf(path, hf_dir) -> "torch.nn.Module":
    """A random Llama written as llama.cpp writes one (F32 tensors, Q/K rows permuted for its rotary
    layout, a gpt2-style BPE vocabulary); returns the transformers model it was written from."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    c = hf.config
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))

    def permute(w, n_head):
        dim = w.shape[0] // n_head // 2
        return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_eos_token_id(tok.token_to_id("<|endoftext|>"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"), ("self_attn.q_proj", "attn_q"),
             ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]
    for l in range(c.num_hidden_layers):
        names.update({f"model.layers.{l}.{a}.weight": f"blk.{l}.{b}.weight" for a, b in parts})
    for k, v in hf.state_dict().items():
        v = v.detach().numpy().astype(np.float32)
        if "q_proj" in k:
            v = permute(v, c.num_attention_heads)
        elif "k_proj" in k:
            v = permute(v, c.num_key_value_heads)
        w.add_tensor(names[k], v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_gguf_loads_through_the_smollm2_path(hf_dirs, tmp_path, monkeypatch):
    """The GGUF reader `smollm2` uses, on a tiny random Llama written as a GGUF: the model read back has
    the logits of the model it was written from — as a .gguf spec and as `smollm2` from the cache."""
    from workbench.loader.hub import SMOLLM2_GGUF

    cache = tmp_path / "cache"
    (cache / "models" / "smollm2").mkdir(parents=True)
    gguf_file = cache / "models" / "smollm2" / SMOLLM2_GGUF
    hf = _write_tiny_gguf(gguf_file, hf_dirs["llama"])
    monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
    t = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=t).logits
        for spec in (str(gguf_file), "smollm2"):
            m = workbench.load(spec)
            assert m.cfg.family == "llama" and m.cfg.bos_token == "<|endoftext|>"
            assert (m(t) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
