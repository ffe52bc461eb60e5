"""The real model, SmolLM2-135M (30 layers, 9 query heads sharing 3 K/V heads, rotary base 100000), against
transformers reading the same GGUF. CI fetches it (`.ci/run`: `workbench fetch smollm2`) and sets
WORKBENCH_REQUIRE_SMOLLM2=1, so there these tests fail instead of skipping when the model is missing."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench
from conftest import rel_err
from workbench.analysis.dla import direct_logit_attribution

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def smollm2():
    from workbench.loader import smollm2_cached

    if not smollm2_cached():
        if os.environ.get("WORKBENCH_REQUIRE_SMOLLM2"):
            pytest.fail("WORKBENCH_REQUIRE_SMOLLM2 is set but SmolLM2 is not cached; run `workbench fetch smollm2`")
        pytest.skip("SmolLM2 is not cached (workbench fetch smollm2)")
    return workbench.load("smollm2")


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' own Llama from the same file, with eager attention so that it returns the patterns."""
    from workbench.loader.hub import SMOLLM2_GGUF, smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def test_smollm2_has_the_architecture_it_claims(smollm2):
    c = smollm2.cfg
    assert (c.family, c.n_layers, c.n_heads, c.n_key_value_heads, c.mlp, c.pos) == ("llama", 30, 9, 3, "swiglu", "rope")
    assert c.rotary_base == 100000.0 and c.rotary_dim == c.d_head


def test_fused_and_explicit_paths_equal_transformers(smollm2, reference):
    """Tolerance 1e-4 of the largest |logit| (the docs' float32 bound for the 30 layers of a real model).
    The unfiltered cache takes the explicit attention path, so grouped-query attention is checked on both
    paths, and every head's pattern of the first, a middle and the last layer against eager attention."""
    t = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        ref = reference(input_ids=t, output_attentions=True)
        fused = smollm2(t)
    logits, cache = smollm2.run_with_cache(t)
    assert rel_err(fused, ref.logits) <= 1e-4 and rel_err(logits, ref.logits) <= 1e-4
    for l in (0, 14, 29):
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], ref.attentions[l], atol=1e-4, rtol=1e-3)


def test_dla_sums_to_the_logit_on_smollm2(smollm2):
    r = direct_logit_attribution(smollm2, "The capital of France is", " Paris")
    assert abs(r.dla_sum - r.logit) <= 1e-4 * max(1.0, abs(r.logit)) and r.nmae > 1e-3


def test_smollm2_exports_as_a_stock_llama_with_its_rotary_base(smollm2, tmp_path):
    """The exporter checks itself against the stock reload; the config keeps θ = 100000 and the 3 K/V heads."""
    from workbench.loader import export

    report = export(smollm2, tmp_path / "hf", check_tokens=smollm2.to_tokens(PROMPT))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 3 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert report["max_abs_logit_diff"] <= 1e-4
