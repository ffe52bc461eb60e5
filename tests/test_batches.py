"""Texts and batches: split by work, deterministic batches, BOS at position 0, bundled data intact."""

import hashlib

import numpy as np
import pytest

from workbench.batches import load_token_data
from workbench.corpus_spec import load_corpus
from workbench.errors import WorkbenchError
from workbench.texts import bundled_path, read_jsonl_xz


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


def _paragraphs(works) -> set[str]:
    return {" ".join(p.split()).casefold() for w in works for p in w.text.split("\n\n") if p.strip()}


def test_no_training_paragraph_is_held_out(tmp_path, tiny_corpus):
    """Content, not titles: no validation paragraph (whitespace and case aside) occurs in training — in the
    bundled corpus (whose Bible repeats passages across books), a folder whose works share paragraphs,
    one file that repeats itself, and a language mixture read back into English."""
    from workbench.texts import Work
    from workbench.languages.synthetic import SyntheticLanguage, is_synthetic

    shared = "The same paragraph, copied into two works."
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(12):
        (folder / f"w{i}.txt").write_text(f"Work {i} begins.\n\n{shared}\n\nWork {i}, paragraph three.")
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(["A refrain.", *(f"Verse {i}." for i in range(30)), "  a   REFRAIN. ", "The end."]))
    for spec in ("english", str(tiny_corpus), str(folder), str(one)):
        c = load_corpus(spec)
        leaked = _paragraphs(c.train) & _paragraphs(c.val)
        assert c.val and not leaked, (spec, sorted(leaked)[:3])
    assert [w.text for w in load_corpus(str(one)).val] == ["Verse 28.\n\nVerse 29.\n\nThe end."]  # no refrain
    english = load_corpus("english")
    kept = sum(len(w.text) for w in english.val)
    assert kept > 1_500_000  # what was dropped is a sliver (2,375 characters of 1.56 M)

    mix = load_corpus("mix:eng=0.4,cyrl=0.3,rev+perm2=0.2,grek=0.1")
    leaked = _paragraphs(mix.train) & _paragraphs(mix.val)
    assert not leaked, sorted(leaked)[:3]
    assert all(w.source == "eng" or is_synthetic(w.source) for w in mix.val)
    back = [w if w.source == "eng" else Work(w.title, SyntheticLanguage(w.source).invert(w.text)) for w in mix.val]
    leaked = _paragraphs(english.train) & _paragraphs(back)  # the same content in another language
    assert not leaked, sorted(leaked)[:3]
