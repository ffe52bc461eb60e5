"""`workbench dla | patch | confidence` on a trained tiny run: output shape, JSON schema, bad input."""

import json

import pytest

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("runs")
    for norm in ("pre-ln", "none", "post-ln"):
        workbench.train(norm, d / norm, steps=4, corpus=str(tiny_corpus), model_overrides=TINY_MODEL,
                        train_overrides=TINY_TRAIN, progress=False)
    return d


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dla_json_schema_and_exactness(runs, capsys):
    code, out, _ = run(["dla", str(runs / "none"), "--prompt", "And God said", "--answer", " the", "--json"], capsys)
    assert code == 0
    r = json.loads(out)
    assert set(r) == {"logit", "dla_sum", "nmae", "components"}
    assert abs(r["dla_sum"] - r["logit"]) <= 1e-4 and r["nmae"] <= 1e-5
    names = [c["name"] for c in r["components"]]
    assert {"embed", "pos_embed", "L0H0", "L1.mlp", "L1.mlp.b_out", "unembed.b_U"} <= set(names)


def test_dla_table_default_answer_and_contrast(runs, capsys):
    code, out, _ = run(["dla", str(runs / "pre-ln"), "--prompt", "And God said", "--contrast", " the", "--top", "5"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("logit") and "NMAE" in lines[0] and len(lines) == 2 + 5


def test_patch_and_confidence(runs, capsys):
    code, out, _ = run(["patch", str(runs / "pre-ln"), "--clean", "the and the and", "--corrupt",
                        "the and the the", "--answer", " the", "--contrast", " and", "--json"], capsys)
    assert code == 0
    r = json.loads(out)
    assert {"clean_metric", "corrupt_metric", "correlation", "units"} <= set(r)
    kinds = {u["kind"] for u in r["units"]}
    assert kinds == {"resid", "head", "mlp"}
    code, out, _ = run(["confidence", str(runs / "pre-ln"), "--sequences", "2", "--top", "2", "--json"], capsys)
    assert code == 0 and len(json.loads(out)) == 4


@pytest.mark.parametrize("argv,message", [
    (["dla", "{run}/post-ln", "--prompt", "And God said"], "not a sum of component outputs"),
    (["dla", "{run}/pre-ln", "--prompt", "And God said", "--answer", " nevertheless-ish"], "not one"),
    (["dla", "{run}/pre-ln", "--prompt", "word " * 40], "context is 32"),
    (["dla", "{run}/missing", "--prompt", "x"], "not found"),
    (["patch", "{run}/pre-ln", "--clean", "a b c", "--corrupt", "a b c d", "--answer", " the", "--contrast", " and"],
     "same number of tokens"),
    (["confidence", "{run}/pre-ln", "--sequences", "0"], "must be positive"),
])
def test_bad_input_is_one_line_exit_2(runs, capsys, argv, message):
    code, out, err = run([a.format(run=runs) for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
