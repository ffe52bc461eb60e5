import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plain-PyTorch reference GPT lives there


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's tokenizer cache."""
    os.environ["WORKBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder corpus of five short 'works' cut from the bundled English text."""
    from workbench.corpus import load_corpus

    d = tmp_path_factory.mktemp("corpus")
    works = load_corpus("english").train[:5]
    for i, w in enumerate(works):
        (d / f"work{i}.txt").write_text(w.text[:40_000])
    return d


TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=32, d_vocab=320)
TINY_TRAIN = dict(batch_size=4, eval_every=4, eval_batches=2, ckpt_every=4, warmup_steps=2)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_corpus):
    """A tiny random Llama with a workbench tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from workbench.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("llama")
    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), 320)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # gains that must be folded
    hf.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(d)
    return d
