"""Sliding-window attention (Mistral, window 7 in tests/conftest.py): the pattern against the written-out
window, the fused and explicit attention paths against each other, and the window against full attention
(tests/test_families.py compares the logits with transformers' own on 40-token sequences)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import workbench
from workbench.errors import WorkbenchError
from workbench.model import GPT


def test_every_query_sees_exactly_its_last_w_keys(hf_dirs):
    m = workbench.load(hf_dirs["mistral"])
    W = m.cfg.sliding_window
    assert W == 7 and m.cfg.family == "mistral"
    t = torch.randint(0, m.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(2))
    _, cache = m.run_with_cache(t)
    for l in range(m.cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [batch, head, query, key]
        i = torch.arange(30)[:, None]
        j = torch.arange(30)[None, :]
        inside = (j <= i) & (j > i - W)
        assert pattern[..., ~inside].abs().max() == 0
        assert (pattern[..., inside] > 0).all()
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


def test_the_fused_path_is_the_explicit_one(hf_dirs):
    m = workbench.load(hf_dirs["mistral"])
    t = torch.randint(0, m.cfg.d_vocab, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = m(t)
        with m.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", lambda p, hook: p) for l in range(m.cfg.n_layers)]):
            explicit = m(t)  # a hook on the pattern forces the written-out path
    assert (fused - explicit).abs().max() <= 1e-5 * fused.abs().max()


def test_the_window_changes_only_sequences_longer_than_it(hf_dirs):
    m = workbench.load(hf_dirs["mistral"])
    full = GPT(dataclasses.replace(m.cfg, sliding_window=None), m.tokenizer)
    full.load_state_dict(m.state_dict())
    full.eval()
    g = torch.Generator().manual_seed(4)
    short, long = torch.randint(0, m.cfg.d_vocab, (2, 7), generator=g), torch.randint(0, m.cfg.d_vocab, (2, 25), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m(short), full(short))
        assert (m(long) - full(long))[:, 7:].abs().max() > 1e-3 * full(long).abs().max()
        torch.testing.assert_close(m(long)[:, :7], full(long)[:, :7])


def test_a_windowed_model_is_not_exported_as_full_attention(hf_dirs, tmp_path):
    from workbench.loader import export

    with pytest.raises(WorkbenchError):
        export(workbench.load(hf_dirs["mistral"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(WorkbenchError, match="sliding_window must be at least 1"):
        workbench.config.ModelConfig(sliding_window=0)
