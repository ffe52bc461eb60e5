"""RMSNorm removal on a Hugging Face Llama model through its own modules (a tiny random one here;
SmolLM2 in docs/ln_removal.md)."""

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from workbench.data import load_token_data
from workbench.errors import WorkbenchError
from workbench.model.gpt import lm_cross_entropy
from workbench.removal import RemovalConfig
from workbench.removal.gpt2 import LN_FREE_EPS
from workbench.removal.llama import LlamaRemoval, remove_rmsnorm_hf


def test_split_norms_compute_what_llama_computes(llama_dir):
    hf = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    t = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(t).logits
        adapter = LlamaRemoval(hf, _Tok(), n_ctx=16)
        assert (adapter.net(t) - ref).abs().max().item() <= 1e-5
    names = [s.name for s in adapter.sites]
    assert names[0] == "model.layers.0.post_attention_layernorm" and names[2] == "model.layers.0.input_layernorm[q,k]"
    assert names[-1] == "model.norm" and len(names) == 3 * 2 + 1


class _Tok:
    def token_to_id(self, s):
        return 0


def test_rmsnorm_free_llama_is_a_stock_llama(llama_dir, tmp_path, tiny_corpus):
    rc = RemovalConfig(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1)
    s = remove_rmsnorm_hf(str(llama_dir), tmp_path / "free", rc, corpus=str(tiny_corpus), progress=False, n_ctx=32)
    assert s["fold_max_abs_logit_diff"] <= 1e-4
    assert [e["norm"] for e in s["schedule"]][-2:] == ["model.norm", "special positions"]
    free = LlamaForCausalLM.from_pretrained(tmp_path / "free").eval()  # stock transformers, no custom code
    assert free.config.rms_norm_eps == LN_FREE_EPS and not free.config.tie_word_embeddings
    for m in free.modules():
        if type(m).__name__.endswith("RMSNorm"):  # identities: the gain cancels 1/sqrt(eps) exactly enough
            assert torch.allclose(m.weight, m.weight[0].expand_as(m.weight))
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "free").backend_tokenizer
    data = load_token_data(str(tiny_corpus), tok.get_vocab_size(), tokenizer=tok)
    with torch.no_grad():
        ce = [lm_cross_entropy(free(input_ids=b).logits, b).item() for b in data.val_batches(2, 4, 32)]
    assert sum(ce) / len(ce) == pytest.approx(s["ce_ln_free"], abs=1e-4)
    # Direct logit attribution: approximate with RMSNorm, exact without.
    from workbench.analysis.dla_hf import direct_logit_attribution_hf

    normed = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    before = direct_logit_attribution_hf(normed, tok, "And God said unto the", answer=" the")
    after = direct_logit_attribution_hf(free, tok, "And God said unto the", answer=" the")
    for r in (before, after):
        assert abs(r.dla_sum - r.logit) <= 1e-4
    assert after.nmae <= 1e-5 < 1e-3 < before.nmae


def test_non_llama_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(WorkbenchError, match="not a Llama-architecture model"):
        LlamaRemoval(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), _Tok())


def test_dla_cli_on_a_llama_directory(llama_dir, capsys):
    import json

    from workbench.cli import main

    assert main(["dla", str(llama_dir), "--prompt", "And God said unto the", "--answer", " the", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in r["components"]]
    assert names[0] == "embed" and "L1H3" in names and "L1.mlp" in names
    assert abs(sum(c["dla"] for c in r["components"]) - r["logit"]) <= 1e-4
    assert main(["dla", str(llama_dir), "--prompt", "And God said", "--answer", " nevertheless-ish"]) == 2


def test_hooked_llama_patching_and_confidence(llama_dir, capsys):
    import json

    from workbench.analysis.confidence import confidence_neurons
    from workbench.analysis.hooked_hf import load_hooked
    from workbench.analysis.patching import patching
    from workbench.cli import main

    m = load_hooked(str(llama_dir))
    t = m.to_tokens("And God said unto the")
    with torch.no_grad():
        assert torch.equal(m(t), LlamaForCausalLM.from_pretrained(llama_dir).eval()(input_ids=t).logits)
    assert {"blocks.1.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.hook_scale"} <= set(m.hook_dict)
    clean = m.to_tokens("And God said unto the")
    changed = 3
    corrupt = clean.clone()
    corrupt[0, changed] = (clean[0, changed] + 7) % m.cfg.d_vocab
    r = patching(m, clean, corrupt, " the", " and")
    resid0 = r.table[(r.table.kind == "resid") & (r.table.layer == 0)]
    # Patching the first layer's input at the one changed position restores the clean run exactly;
    # every other position changes nothing.
    assert resid0[resid0.pos == changed].activation.item() == pytest.approx(r.clean_metric - r.corrupt_metric, abs=1e-5)
    assert resid0[resid0.pos != changed].activation.abs().max() <= 1e-5
    from workbench.analysis.dla_hf import direct_logit_attribution_hf
    from workbench.analysis.report import attribution_report

    plain = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    a = direct_logit_attribution_hf(plain, m.tokenizer, "And God said unto the", answer=" the")
    b = direct_logit_attribution_hf(m.hf, m.tokenizer, "And God said unto the", answer=" the")  # swapped final norm
    assert a.table.dla.tolist() == pytest.approx(b.table.dla.tolist(), abs=1e-6) and a.nmae == pytest.approx(b.nmae)
    row = attribution_report({"tiny llama": m}, sequences=2).iloc[0]
    assert row["norm"].startswith("RMSNorm") and 0 <= row["conf_null_share"] <= 1
    c = confidence_neurons(m, torch.randint(0, m.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert len(c) == 10 and c.null_share.between(0, 1).all()
    text = "And God said unto the"
    assert main(["patch", str(llama_dir), "--clean", text, "--corrupt", text, "--answer", " the",
                 "--contrast", " and", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clean_metric"] == pytest.approx(r.clean_metric, abs=1e-5) == pytest.approx(out["corrupt_metric"], abs=1e-5)
