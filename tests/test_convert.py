"""`workbench convert`: the directory it writes, loaded back, computes the source's logits on text the
command never checked (not the number it reports), for Pre-LN and LayerNorm Scaling sources whose gains
and biases are far from trivial."""

import json

import pytest
import torch

import workbench
from conftest import TINY_MODEL, rel_err, save_run, scale_gpt
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.tokenizer import train_tokenizer

# Not in the bundled corpus the command checks on: the comparison is on text it never saw.
FRESH = ["The committee debates the budget while a quick brown fox jumps over the lazy dog.",
         "Quantum error correction needs many physical qubits; 42 zebras grazed near the river."]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_corpus):
    """Run directories of a random pre-ln and lns model, every weight, gain and bias far from its init."""
    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), TINY_MODEL["d_vocab"])
    runs = {}
    for seed, norm in enumerate(("pre-ln", "lns")):
        m = scale_gpt(GPT(ModelConfig(norm=norm, **{**TINY_MODEL, "n_layers": 3}), tok), seed)
        runs[norm] = save_run(m, tmp_path_factory.mktemp(norm))
    return runs


def fresh_tokens(m):
    return m.to_tokens(FRESH)[:, : m.cfg.n_ctx]


@pytest.mark.parametrize("to", ["folded", "pre-rms", "pre-crms"])
@pytest.mark.parametrize("source", ["pre-ln", "lns"])
def test_converted_directory_reloads_with_the_sources_logits(sources, source, to, tmp_path, tiny_corpus, capsys):
    out = tmp_path / to
    assert main(["convert", str(sources[source]), "--to", to, "--out", str(out), "--corpus", str(tiny_corpus)]) == 0
    printed = json.loads(capsys.readouterr().out)
    src, conv = workbench.load(sources[source]), workbench.load(out)
    assert src.blocks[0].ln1.affine.b.abs().max() > 0.3 and src.blocks[0].attn.b_O.abs().max() > 0.3
    assert conv.cfg.norm == {"folded": "pre-ln", "pre-rms": "pre-rms", "pre-crms": "pre-crms"}[to]
    assert conv.cfg.d_model == src.cfg.d_model - (to == "pre-crms")
    # the norms' gains and biases really moved into the weights: what is left is the identity affine
    for name, p in conv.named_parameters():
        if ".affine." in name:
            assert torch.all(p == (1.0 if name.endswith(".w") else 0.0)), name
    t = fresh_tokens(src)
    with torch.no_grad():
        ref = src(t)
        # float32 round-off: ≤ 1.7e-6 of the logit scale measured here and on GPT-2 (docs/ln_removal.md)
        assert rel_err(conv(t), ref) <= 5e-6
    assert ref.abs().max() > 5  # not a near-zero model: the final norm keeps pre-LN logits at this scale
    assert printed == json.loads((out / "summary.json").read_text())
