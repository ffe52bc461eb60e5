"""A zoo of gated-MLP (SwiGLU) + RoPE members: trained by `workbench zoo --mlp swiglu --pos rope`, and every
analysis command runs on them with its exactness guarantees intact."""

import json

import pytest

import workbench
from conftest import TINY_MODEL
from workbench.cli import main


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("swiglu") / "zoo"
    code = main(["zoo", "--norms", "pre-rms,pre-ln,lns", "--mlp", "swiglu", "--pos", "rope", "--steps", "6",
                 "--corpus", str(tiny_corpus), "--out", str(d), "--quiet", "--dtype", "float32"])
    assert code == 0
    return d


def test_zoo_members_are_swiglu_rope_and_say_so(zoo, capsys, tiny_corpus, tmp_path):
    for norm in ("pre-rms", "pre-ln", "lns"):
        m = workbench.load(zoo / norm)
        assert (m.cfg.mlp, m.cfg.pos, m.cfg.act_fn, m.cfg.norm) == ("swiglu", "rope", "silu", norm)
    assert set(json.loads((zoo / "zoo.json").read_text())) == {"pre-rms", "pre-ln", "lns"}
    code = main(["zoo", "--norms", "pre-rms", "--mlp", "swiglu", "--steps", "2", "--corpus", str(tiny_corpus),
                 "--out", str(tmp_path / "z"), "--quiet", "--dtype", "float32"])
    assert code == 0 and "architecture of every member: swiglu MLP, learned positions" in capsys.readouterr().out


@pytest.mark.parametrize("norm", ["pre-rms", "lns"])
def test_dla_patch_and_confidence_run_on_swiglu_members(zoo, capsys, norm):
    run = str(zoo / norm)
    assert main(["dla", run, "--prompt", "And God said unto the", "--answer", " the", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert abs(r["dla_sum"] - r["logit"]) <= 1e-4 * max(1.0, abs(r["logit"]))  # attributions sum to the logit
    assert any(c["name"] == "L1.mlp" for c in r["components"])
    assert main(["patch", run, "--clean", "And God said unto Moses", "--corrupt", "And God said unto Aaron",
                 "--answer", " the", "--contrast", " and", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p
    assert main(["confidence", run, "--sequences", "4", "--top", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_diagnose_compare_and_ranker_run_on_swiglu_members(zoo, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", str(zoo / "pre-rms"), "--tokens", "512", "--batches", "1", "--corpus", str(tiny_corpus),
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    layers = d["layers"] if "layers" in d else d["residual"]["layers"]
    assert len(layers) == TINY_MODEL["n_layers"] + 1 and all(l["resid_var"] > 0 for l in layers)
    (tmp_path / "cmp").mkdir()
    assert main(["compare", str(zoo), "--metric", "resid_var", "--tokens", "512", "--out", str(tmp_path / "cmp")]) == 0
    assert len(list((tmp_path / "cmp").iterdir())) >= 2
    assert main(["rank-languages", str(zoo / "lns"), "--langs", "ita", "--max-units", "4", "--out",
                 str(tmp_path / "r.json"), "--quiet"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r
