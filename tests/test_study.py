"""Layer-ablation studies from TOML: invariants between ablation kinds, bad study files."""

import pytest

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.analysis.depth import skip_block_delta_ce
from workbench.analysis.study import load_study
from workbench.studies import run_study
from workbench.cli import main


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("zoo")
    for norm in ("pre-ln", "post-ln"):
        workbench.train(norm, d / norm, steps=6, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False)
    return d


def write(tmp_path, body: str):
    f = tmp_path / "study.toml"
    f.write_text(body)
    return f


def test_study_table_and_invariants(tmp_path, zoo):
    f = write(tmp_path, f"""
[study]
name = "t"
tokens = 512
[[models]]
spec = "{zoo / 'pre-ln'}"
[[models]]
spec = "{zoo / 'post-ln'}"
[[ablations]]
kind = "skip"
blocks = "all"
[[ablations]]
kind = "zero"
blocks = [0, 1]
[[ablations]]
kind = "mean"
blocks = ["0-1"]
""")
    t = run_study(f, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "study.csv").exists() and (tmp_path / "out" / "study_mean.html").exists()
    d = t[t.metric == "delta_ce"].set_index(["model", "kind", "blocks"]).value
    pre, post = str(zoo / "pre-ln"), str(zoo / "post-ln")
    for b in ("0", "1"):
        # Pre-LN: zeroing a block's outputs is skipping it; Post-LN: the norms still act, so not.
        assert d[(pre, "zero", b)] == pytest.approx(d[(pre, "skip", b)], abs=1e-5)
        assert d[(post, "zero", b)] != pytest.approx(d[(post, "skip", b)], abs=1e-4)
    kl = t[t.metric == "kl"].value
    top1 = t[t.metric == "top1_agreement"].value
    assert (kl >= -1e-6).all() and ((top1 >= 0) & (top1 <= 1)).all()
    # Same numbers as the independent skip-block computation of the diagnostics.
    from workbench.analysis.depth import corpus_batches
    m = workbench.load(pre)
    _, deltas = skip_block_delta_ce(m, corpus_batches(m, "english", 512))
    assert d[(pre, "skip", "1")] == pytest.approx(deltas[1], abs=1e-4)


@pytest.mark.parametrize("body,message", [
    ('[[models]]\nspec = "{zoo}/pre-ln"\n[[ablations]]\nkind = "skip"\nblocks = [7]', "block 7 does not exist"),
    ('[[models]]\nspec = "{zoo}/pre-ln"\n[[ablations]]\nkind = "skip"\nblocks = ["1-5"]', "does not exist"),
    ('[[models]]\nspec = "{zoo}/pre-ln"\n[[ablations]]\nkind = "scramble"', "kind 'scramble' unknown"),
    ('[[ablations]]\nkind = "skip"', "needs [[models]]"),
    ('[[models]]\nspec = "{zoo}/pre-ln"', "at least one [[ablations]]"),
    ('[[models]\nspec = ', "not valid TOML"),
    ('[[models]]\nspec = "{zoo}/nothing-here"\n[[ablations]]\nkind = "skip"', "unknown model spec"),
])
def test_bad_study_files(tmp_path, zoo, capsys, body, message):
    f = write(tmp_path, body.replace("{zoo}", str(zoo)))
    assert main(["study", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_example_study_file_parses():
    from conftest import ROOT

    s = load_study(ROOT / "analyses" / "layer_ablation_study.toml")
    assert s.models and {a.kind for a in s.ablations} == {"skip", "zero", "mean"}


def test_study_on_hugging_face_families(tmp_path, hf_dirs):
    """The same study file runs over pretrained-family models (a Llama and a GPT-NeoX with parallel
    blocks): every block's skip ablation is a finite, non-zero ΔCE."""
    llama, neox = str(hf_dirs["llama"]), str(hf_dirs["gpt_neox"])
    f = write(tmp_path, f"""
[study]
name = "hf"
tokens = 256
[[models]]
spec = "{llama}"
[[models]]
spec = "{neox}"
[[ablations]]
kind = "skip"
blocks = "all"
""")
    t = run_study(f, tmp_path / "out", progress=False)
    d = t[t.metric == "delta_ce"]
    assert set(d.model) == {llama, neox} and d.value.notna().all() and (d.value.abs() > 0).all()
