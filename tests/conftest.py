import os
import random
import shutil
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
    """Tests never read or write the user's tokenizer cache; a SmolLM2 GGUF already fetched there is
    linked in (read-only use), so the tests that take ``smollm2`` when it is cached see it."""
    user = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))
    cache = tmp_path_factory.mktemp("cache")
    if (user / "models" / "smollm2").is_dir():
        (cache / "models").mkdir()
        (cache / "models" / "smollm2").symlink_to(user / "models" / "smollm2", target_is_directory=True)
    os.environ["WORKBENCH_CACHE"] = str(cache)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder corpus of five short 'works' cut from the bundled English text."""
    from workbench.corpus_spec import load_corpus

    d = tmp_path_factory.mktemp("corpus")
    works = load_corpus("english").train[:5]
    for i, w in enumerate(works):
        (d / f"work{i}.txt").write_text(w.text[:40_000])
    return d


TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=32, d_vocab=320)
TINY_TRAIN = dict(batch_size=4, eval_every=4, eval_batches=2, ckpt_every=4, warmup_steps=2)
SWIGLU = dict(mlp="swiglu", act_fn="silu", pos="rope")


@pytest.fixture(scope="session")
def swiglu_run(tmp_path_factory, tiny_corpus) -> Path:
    """A tiny pre-RMS SwiGLU/RoPE zoo model trained 8 steps: what the removal methods for gated MLPs run on."""
    import workbench

    d = tmp_path_factory.mktemp("swiglu") / "pre-rms"
    workbench.train("pre-rms", d, steps=8, corpus=str(tiny_corpus), model_overrides={**TINY_MODEL, **SWIGLU},
                    train_overrides=TINY_TRAIN, progress=False)
    return d


def scale_weights(hf, seed: int = 0) -> None:
    """Weights large enough that attention, MLPs and norms are far from linear: every matrix
    N(0, 0.35²) (2/√d_model for the tiny models' d_model = 32), norm gains U(0.5, 1.5), biases N(0, 0.2²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.35)
            elif ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def rel_err(a, b) -> float:
    """max |a − b| / max |b|: an error relative to the scale of the reference ``b`` (logits of models
    this far from linear reach tens to thousands, so an absolute tolerance would mean nothing)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def scale_gpt(model, seed: int = 0):
    """``scale_weights`` for the workbench's own GPT, by its parameter names (its ``b_Q`` is 2-D but a
    bias): every ``W_*`` matrix N(0, 0.35²), norm gains and DyT's α U(0.5, 1.5), every other parameter
    N(0, 0.2²); batch-statistics norms get running means N(0, 0.5²) and variances U(0.5, 4) so that
    at evaluation they are far from the identity too. Returns the model, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf.startswith("W_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.35)
            elif name.endswith("affine.w") or leaf == "alpha":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            leaf = name.split(".")[-1]
            if leaf == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            elif leaf in ("running_var", "running_phi"):
                b.copy_(torch.rand(b.shape, generator=g) * 3.5 + 0.5)
    return model.eval()


def save_run(model, d: Path) -> Path:
    """Write ``model`` (with its tokenizer) as a run directory that ``workbench.load`` and the CLI read."""
    from workbench import io

    d.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(d / io.CONFIG_FILE, {"model": model.cfg.to_dict(), "train": None})
    io.atomic_write_text(d / io.TOKENIZER_FILE, model.tokenizer.to_str())
    io.save_weights(model, d / io.MODEL_FILE)
    return d


def assert_round_trips(model, d: Path, tokens) -> None:
    """The config survives JSON unchanged, and the run directory written from ``model`` reloads to a model
    with bit-equal logits on ``tokens``."""
    import json

    import workbench
    from workbench.config import ModelConfig

    c = model.cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(c))).to_dict() == c
    again = workbench.load(save_run(model, d))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))


def _hf_config(family: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    return {
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                   eos_token_id=0),
        # rotary bases other than the default 10000 (SmolLM2's is 100000): a reader or exporter that
        # drops the base computes another model
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=250000.0),
        # QK-norm per head; a head_dim (12) other than hidden/heads (8), as Qwen3's own configs have
        "qwen3": lambda: Qwen3Config(**common, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False,
                                     rope_theta=30000.0, rms_norm_eps=1e-5),
        # sliding window 7: the tests' sequences (up to 40 tokens) are far longer
        "mistral": lambda: MistralConfig(**common, num_key_value_heads=2, sliding_window=7, tie_word_embeddings=False,
                                         rope_theta=40000.0),
        "gpt_neox": lambda: GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=True,
                                          tie_word_embeddings=False, rope_parameters=dict(
                                              rope_type="default", rope_theta=20000.0, partial_rotary_factor=0.5)),
    }[family]()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, tiny_corpus):
    """One tiny random Hugging Face directory per supported family (weights far from linear, a workbench
    tokenizer whose <|endoftext|> is BOS and EOS), as transformers saves them."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from workbench.tokenizer import train_tokenizer

    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), 320)
    dirs = {}
    for i, family in enumerate(("gpt2", "llama", "qwen2", "gpt_neox", "qwen3", "mistral")):
        d = tmp_path_factory.mktemp(family)
        torch.manual_seed(i)
        hf = AutoModelForCausalLM.from_config(_hf_config(family, tok.get_vocab_size()))
        scale_weights(hf, seed=i)
        hf.save_pretrained(d)
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(d)
        dirs[family] = d
    return dirs


@pytest.fixture(scope="session")
def llama_dir(hf_dirs):
    return hf_dirs["llama"]


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory, hf_dirs):
    """A tiny random Gemma 2 directory (tests/test_gemma.py's config: sandwich norms, soft-caps, sliding
    windows), with the tests' tokenizer: for the pages and analyses that take any model."""
    from transformers import AutoModelForCausalLM

    from test_gemma import SEED, _hf_config

    d = tmp_path_factory.mktemp("gemma2_dir")
    torch.manual_seed(SEED)
    hf = AutoModelForCausalLM.from_config(_hf_config("gemma2"))
    scale_weights(hf, seed=SEED)
    hf.save_pretrained(d)
    for f in hf_dirs["llama"].glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    return d


def every_analysis_runs(m) -> None:
    """Patching (its first-layer residual patch equals the whole clean − corrupt difference), confidence
    neurons and diagnose on a loaded model: what a family test asks of every analysis beyond DLA."""
    import pytest

    from workbench.analysis.confidence import confidence_neurons
    from workbench.analysis.depth import diagnose
    from workbench.analysis.patching import patching

    clean = m.to_tokens("And God said unto the")
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 7) % m.cfg.d_vocab
    r = patching(m, clean, corrupt, " the", " and")
    resid0 = r.table[(r.table.kind == "resid") & (r.table.layer == 0)]
    assert resid0[resid0.pos == 3].activation.item() == pytest.approx(r.clean_metric - r.corrupt_metric, abs=1e-4)
    tokens = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    c = confidence_neurons(m, tokens)
    assert len(c) == 10 and c.null_share.between(0, 1).all()
    d = diagnose(m, corpus="english", tokens=256, grad_batches=1)
    assert len(d["residual"]["layers"]) == m.cfg.n_layers + 1 and d["val_ce"] > 0
