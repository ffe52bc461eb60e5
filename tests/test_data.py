"""Corpora and batches: split by work, deterministic batches, BOS at position 0, bundled data intact."""

import hashlib

import numpy as np
import pytest

from workbench.corpora import load_corpus
from workbench.corpus import bundled_path, read_jsonl_xz
from workbench.data import load_token_data
from workbench.errors import WorkbenchError


def test_bundled_english_split_by_work_and_source():
    c = load_corpus("english")
    train_titles = {w.title for w in c.train}
    val_titles = {w.title for w in c.val}
    assert not train_titles & val_titles
    assert len(train_titles) + len(val_titles) == 128
    assert {w.source for w in c.val} == {"austen", "shakespeare", "world_english_bible"}
    # No line of a validation work is a training work's (whole works, not lines, are held out).
    assert all(w.title in val_titles for w in c.val)


def test_bundled_files_match_provenance_checksums():
    expected = {
        "english.jsonl.xz": "2cb914438d5cf26e51277aa3c0334bbc2c76898495704fb4833b82038b56668c",
        "udhr.jsonl.xz": "4d76911a3e39ab297fec531a32c9c6124751e703481adf379d07bb32c5dbc747",
    }
    for name, sha in expected.items():
        assert hashlib.sha256(bundled_path(name).read_bytes()).hexdigest() == sha
    udhr = read_jsonl_xz(bundled_path("udhr.jsonl.xz"))
    assert len(udhr) == 508 and any(r["code"] == "eng" for r in udhr)


def test_batches_are_a_pure_function_of_seed_and_step(tiny_corpus):
    d = load_token_data(str(tiny_corpus), 320)
    a = d.train_batch(7, 4, 32, seed=0)
    assert np.array_equal(a, d.train_batch(7, 4, 32, seed=0))
    assert not np.array_equal(a, d.train_batch(8, 4, 32, seed=0))
    assert not np.array_equal(a, d.train_batch(7, 4, 32, seed=1))
    assert (a[:, 0] == d.bos).all() and a.shape == (4, 32)
    v = d.val_batches(2, 4, 32)
    assert len(v) == 2 and all(b.shape == (4, 32) for b in v)


def test_unigram_baseline_is_the_smoothed_unigram_cross_entropy(tiny_corpus):
    d = load_token_data(str(tiny_corpus), 320)
    counts = np.bincount(d.train, minlength=320) + 1.0
    p = counts / counts.sum()
    assert d.unigram_cross_entropy() == pytest.approx(float(np.mean(-np.log(p[d.val]))))


def test_single_file_corpus_holds_out_its_last_paragraphs(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    c = load_corpus(str(f))
    assert c.val[0].text.startswith("paragraph 18") and "paragraph 17" in c.train[0].text


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_corpus_is_a_clear_error(tmp_path, content):
    (tmp_path / "a.txt").write_text(content)
    with pytest.raises(WorkbenchError, match="empty"):
        load_corpus(str(tmp_path))
