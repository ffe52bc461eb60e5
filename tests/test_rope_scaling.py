"""Scaled rotary positions (Llama 3's ``llama3``, ``linear``): the frequencies against the formula written
out per dimension, and tiny random Llamas built from transformers configs against transformers' own logits
on sequences longer than the pre-training context the scaling refers to."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import workbench
from conftest import scale_weights
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model.components import rotary_inv_freq

# rope_theta 100 with d_head 8: wavelengths 6.3, 20, 63, 199 against bands at 8 and 32 — every band present
LLAMA3 = dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def _llama3_by_hand(dim: int, base: float, factor: float, low: float, high: float, context: int) -> list[float]:
    out = []
    for i in range(0, dim, 2):
        f = base ** (-i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < context / high:
            out.append(f)
        elif wavelen > context / low:
            out.append(f / factor)
        else:
            s = (context / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


def test_the_frequencies_are_the_written_out_formulas():
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    got = rotary_inv_freq(64, 500000.0, scaling)
    want = _llama3_by_hand(64, 500000.0, 8.0, 1.0, 4.0, 32)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=2e-6, atol=0)
    bands = {round(g / w, 6) for g, w in zip(got.tolist(), rotary_inv_freq(64, 500000.0).tolist())}
    assert 1.0 in bands and 0.125 in bands and any(0.125 < b < 1 for b in bands)  # all three bands present
    torch.testing.assert_close(rotary_inv_freq(16, 20000.0, {"rope_type": "linear", "factor": 2.0}),
                               rotary_inv_freq(16, 20000.0) / 2)


def _llama_dir(tmp_path, name, rope: dict):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_parameters=rope)
    hf = AutoModelForCausalLM.from_config(cfg)
    scale_weights(hf, seed=3)
    d = tmp_path / name
    hf.save_pretrained(d)
    return d, hf.eval()


@pytest.mark.parametrize("name,rope", [("llama3", LLAMA3), ("linear", dict(rope_type="linear", factor=2.5, rope_theta=20000.0))])
def test_a_rope_scaled_llama_has_transformers_logits_beyond_its_context(tmp_path, name, rope):
    d, hf = _llama_dir(tmp_path, name, rope)
    m = workbench.load(d)
    assert m.cfg.rotary_scaling["rope_type"] == name
    t = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(1))  # 60 > 32 (llama3 context)
    with torch.no_grad():
        ref, ours = hf(input_ids=t).logits, m(t)
        plain = workbench.load(d)
        plain.blocks[0].attn.rotary.inv_freq.copy_(rotary_inv_freq(plain.cfg.rotary_dim, plain.cfg.rotary_base))
        plain.blocks[0].attn.rotary._cache = None
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (plain(t) - ref).abs().max().item() > 1e-3 * ref.abs().max().item()  # the scaling matters here


def test_unimplemented_scalings_are_refused_in_one_line(tmp_path, capsys):
    d, _ = _llama_dir(tmp_path, "dyn", LLAMA3)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["dla", str(d), "--prompt", "And God said"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rope scaling 'yarn' is not supported (supported: linear, llama3" in err and "\n" not in err
    with pytest.raises(WorkbenchError, match="rope scaling 'llama3' needs exactly"):
        workbench.config.ModelConfig(pos="rope", rotary_scaling={"rope_type": "llama3", "factor": 8.0})


def test_a_rope_scaled_model_is_not_exported_as_a_plain_llama(tmp_path):
    from workbench.loader import export

    d, _ = _llama_dir(tmp_path, "l3", LLAMA3)
    with pytest.raises(WorkbenchError, match="full unscaled rotary"):
        export(workbench.load(d), tmp_path / "out")
    assert not (tmp_path / "out").exists()
