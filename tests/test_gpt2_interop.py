"""GPT-2 checkpoints: load → ours (same logits), remove LN, export to a stock GPT2LMHeadModel, load back."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import workbench
from conftest import rel_err, scale_weights
from workbench.removal import RemovalConfig, is_norm_free, remove_ln
from workbench.removal.api import convert_to_dir
from workbench.loader.gpt2 import export_gpt2
from workbench.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_corpus):
    """A random GPT-2 with weights far from linear (every matrix, gain and bias: ``scale_weights``) saved
    the way transformers saves; MLP pre-activations reach |x| > 2, where exact and tanh GELU differ."""
    d = tmp_path_factory.mktemp("gpt2")
    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), 320)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    scale_weights(hf)
    hf.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    return d


def tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_loaded_gpt2_has_the_logits_of_transformers(gpt2_dir):
    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ours = workbench.load(gpt2_dir)
    assert ours.cfg.norm == "pre-ln" and ours.cfg.n_ctx == 32
    t = tokens(ours.cfg.d_vocab)
    with torch.no_grad():
        # 1e-5 of the logit scale: float32 round-off is ~3e-7, exact GELU in place of tanh GELU ~2e-4
        assert rel_err(ours(t), hf(t).logits) <= 1e-5


def test_round_trip_gpt2_to_ln_free_to_stock_transformers(gpt2_dir, tmp_path, tiny_corpus):
    s = remove_ln(gpt2_dir, tmp_path / "free", RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2,
                                                                  eval_batch_size=4),
                  corpus=str(tiny_corpus), progress=False)
    free = workbench.load(tmp_path / "free")
    assert is_norm_free(free)
    t = tokens(free.cfg.d_vocab, seed=1)
    with torch.no_grad():
        ref = free(t)
    scale = ref.abs().max().item()
    assert s["pretraining_tokens"] is None and s["fold_max_abs_logit_diff"] <= 1e-5 * scale
    report = export_gpt2(free, tmp_path / "hf")
    # the identity LayerNorm (x / sqrt(ε) · sqrt(ε), ε = 1e15) costs two roundings: ~6e-6 measured
    assert report["ln_free"] and report["max_abs_logit_diff"] <= 3e-5 * scale
    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()  # no custom code
    with torch.no_grad():
        assert rel_err(stock(t).logits, ref) <= 3e-5
        back = workbench.load(tmp_path / "hf")  # our export read back: LN-free again
        assert back.cfg.norm == "none" and is_norm_free(back)
        assert rel_err(back(t), ref) <= 1e-5


def test_export_of_a_pre_ln_model_with_an_unembedding_bias(gpt2_dir, tmp_path):
    m = workbench.load(gpt2_dir)
    with torch.no_grad():
        m.unembed.b_U.normal_()  # GPT-2 has no lm_head bias: it must ride on ln_f's constant
    export_gpt2(m, tmp_path / "hf")
    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    t = tokens(m.cfg.d_vocab, seed=2)
    with torch.no_grad():
        assert rel_err(stock(t).logits, m(t)) <= 1e-5


@pytest.mark.parametrize("to", ["folded", "pre-rms", "pre-crms"])
def test_convert_gpt2(gpt2_dir, tmp_path, to, tiny_corpus):
    """The written run, loaded back, has the checkpoint's logits on text the conversion was not checked on."""
    s = convert_to_dir(gpt2_dir, to, tmp_path / to, corpus=str(tiny_corpus))
    assert s["eval"].endswith("validation split")
    src, out = workbench.load(gpt2_dir), workbench.load(tmp_path / to)
    assert out.cfg.norm == ("pre-ln" if to == "folded" else to) and out.cfg.family == "gpt2"
    t = src.to_tokens(["The committee debates the budget while a quick brown fox jumps over the lazy dog."])
    with torch.no_grad():
        assert rel_err(out(t[:, :32]), src(t[:, :32])) <= 5e-6  # float32 round-off; ≤ 1.7e-6 measured


def test_hf_name_resolves_through_the_hub_cache(gpt2_dir, tmp_path):
    """hf:NAME finds a GPT-2 in the Hugging Face cache (offline here: the snapshot is put there by hand,
    in the cache's own layout) and loads it into the workbench family."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(gpt2_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    code = ("import workbench, torch; m = workbench.load('hf:someone/tiny-gpt2'); "
            "print(type(m).__name__, m.cfg.norm, m.cfg.n_layers)")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["GPT", "pre-ln", "2"]
