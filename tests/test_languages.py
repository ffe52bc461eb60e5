"""Language Ranker: parallel corpus, synthetic languages and mixtures, the encoder's NLL and pooling
against unbatched references, the sanity properties of the score, the CLI's bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import main
from workbench.corpus_spec import load_corpus
from workbench.errors import WorkbenchError
from workbench.languages.encode import _windows, encode_texts, text_model
from workbench.languages.mixture import heldout_parallel, mixture_corpus, parse_mixture
from workbench.languages.parallel import load_parallel
from workbench.languages.ranker import rank_languages, spearman
from workbench.languages.study import mixture_spec, mixture_study
from workbench.languages.synthetic import FAMILIES, SyntheticLanguage

TEXTS = ["All human beings are born free and equal in dignity and rights.",
         "Everyone has the right to life, liberty and security of person.",
         "No one shall be held in slavery or servitude; slavery and the slave trade shall be prohibited in all their forms.",
         "Hi."]


@pytest.fixture(scope="module")
def run_path(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("ranker") / "pre-ln"
    workbench.train("pre-ln", d, steps=8, corpus=str(tiny_corpus), model_overrides={**TINY_MODEL, "n_ctx": 128},
                    train_overrides=TINY_TRAIN, progress=False)
    return d


@pytest.fixture(scope="module")
def model(run_path):
    return workbench.load(run_path)


def _reference_nll(m, text: str) -> float:
    ids = [m.tokenizer.token_to_id("<|endoftext|>")] + m.tokenizer.encode(text).ids
    with torch.no_grad():
        logits = m(torch.tensor([ids]))[0, :-1]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


@torch.no_grad()
def test_nll_and_pooling_match_unbatched_references(model):
    tm = text_model(model)
    enc = encode_texts(tm, TEXTS, "mean", batch_tokens=4096)
    one = encode_texts(tm, TEXTS, "mean", batch_tokens=1)  # every text alone: no padding at all
    assert torch.allclose(enc.pooled, one.pooled, atol=1e-5) and torch.allclose(enc.nll, one.nll, atol=1e-4)
    for i, t in enumerate(TEXTS):
        assert enc.nll[i].item() == pytest.approx(_reference_nll(model, t), rel=1e-5)
        ids = torch.tensor([[0] + model.tokenizer.encode(t).ids])
        _, cache = model.run_with_cache(ids)
        ref_mean = cache["blocks.1.hook_resid_post"][0, 1:].mean(0)  # position 0 (the start token) left out
        assert torch.allclose(enc.pooled[i, 1], ref_mean, atol=1e-5)
    last = encode_texts(tm, TEXTS, "last")
    ids = torch.tensor([[0] + model.tokenizer.encode(TEXTS[0]).ids])
    _, cache = model.run_with_cache(ids)
    assert torch.allclose(last.pooled[0, 0], cache["blocks.0.hook_resid_post"][0, -1], atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("pooling", ["mean", "weighted", "last"])
def test_an_empty_text_pools_its_start_token_alone_or_padded(model, pooling):
    tm = text_model(model)
    start = model.run_with_cache(torch.tensor([[0]]))[1]
    want = torch.stack([start[f"blocks.{i}.hook_resid_post"][0, 0] for i in range(model.cfg.n_layers)])
    alone = encode_texts(tm, [""], pooling)
    padded = encode_texts(tm, ["", TEXTS[0]], pooling)
    assert torch.allclose(alone.pooled[0], want, atol=1e-5) and torch.allclose(padded.pooled[0], want, atol=1e-5)
    assert alone.nll[0].item() == 0.0 and alone.n_tokens == [0]


@torch.no_grad()
def test_long_texts_are_scored_by_strided_windows(model):
    tm = text_model(model, max_tokens=9)
    text = TEXTS[2] * 2
    ids = model.tokenizer.encode(text).ids
    enc = encode_texts(tm, [text], "last")
    assert enc.truncated == [True] and enc.n_tokens == [len(ids)]
    windows = _windows(ids, 8)
    ref = 0.0
    for i in range(len(ids)):  # token by token: the window that scores it, run on its own
        start = max(s for s, first in windows if first <= i)
        ctx = [0] + ids[start:i]
        ref -= torch.log_softmax(model(torch.tensor([ctx]))[0, -1], -1)[ids[i]].item()
    assert enc.nll[0].item() == pytest.approx(ref, rel=1e-5)
    scored = sorted(i for k, (s, first) in enumerate(windows) for i in range(first, min(s + 8, len(ids))))
    assert scored == list(range(len(ids)))  # every token once


def test_english_against_english_scores_one_at_every_layer(model, tmp_path):
    eng = next(r for r in _udhr_rows() if r["code"] == "eng")
    path = tmp_path / "copy.jsonl"
    path.write_text("\n".join(json.dumps({**eng, "code": c, "name": c}) for c in ("eng", "eng_copy")))
    for center in ("language", "none"):
        r = rank_languages(model, str(path), ["eng_copy"], max_units=6, center=center)
        assert np.allclose(r["languages"][0]["per_layer"], 1.0, atol=1e-5)
        assert np.allclose(r["languages"][0]["score_ci95"], 1.0, atol=1e-5)
        assert r["languages"][0]["bits_per_english_byte"] == pytest.approx(r["english"]["bits_per_byte"], rel=1e-6)


def test_shuffled_pairing_scores_lower_and_results_are_deterministic(model):
    kw = dict(langs=["sco", "ita"], max_units=12)
    aligned = rank_languages(model, "udhr", **kw)
    again = rank_languages(model, "udhr", **kw)
    shuffled = rank_languages(model, "udhr", pairing="shuffled", **kw)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(aligned) == strip(again)
    by = {r["code"]: r["score"] for r in shuffled["languages"]}
    for r in aligned["languages"]:
        assert r["score"] > by[r["code"]] + 0.01
        lo, hi = r["score_ci95"]
        assert lo <= r["score"] <= hi and hi - lo > 0
    assert {r["code"] for r in aligned["languages"]} == {"sco", "ita"}
    assert aligned["units"] == sorted(aligned["units"], key=int) and len(aligned["units"]) == 12


def test_bits_per_english_byte_against_a_reference(model):
    r = rank_languages(model, "udhr", ["ita"], max_units=3)
    pc = load_parallel("udhr")
    pairs = [p for p in pc.pairs(pc.languages["ita"], "article") if p[0] in r["units"]]
    bits = sum(_reference_nll(model, t) for _, _, t in pairs) / math.log(2)
    row = r["languages"][0]
    assert row["bits_per_english_byte"] == pytest.approx(bits / sum(len(e.encode()) for _, e, _ in pairs), rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(bits / sum(len(t.encode()) for _, _, t in pairs), rel=1e-5)


def test_paragraph_units_and_iso_codes():
    pc = load_parallel("udhr")
    (sco,) = pc.resolve(["sco"], "paragraph")
    assert len(pc.pairs(sco, "paragraph")) == 50
    assert [lang.code for lang in pc.resolve(["deu_1996", "ita"], "article")] == ["deu_1996", "ita"]
    with pytest.raises(WorkbenchError, match="ambiguous"):
        pc.resolve(["deu"], "article")
    with pytest.raises(WorkbenchError, match="aligned_with_english"):
        pc.resolve(["fra"], "paragraph")
    assert len(pc.resolve(None, "paragraph")) == 75 and len(pc.resolve(None, "article")) == 507


def test_spearman_against_the_textbook_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    d = (np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))).astype(float)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d ** 2).sum() / (12 * (12 ** 2 - 1)))
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
    assert math.isnan(spearman([1, 2], [2, 1]))


def test_synthetic_languages_are_invertible_and_parallel():
    text = load_corpus("english").val[0].text[:60_000]
    for family, names in FAMILIES.items():
        for name in names:
            lang = SyntheticLanguage(name)
            out = lang(text)
            assert out != text and lang.invert(out) == text, name
            assert lang.family.endswith(family if family != "reverse" else "vocabulary")
    words = "The Lord said unto Moses"
    assert len(SyntheticLanguage("perm3")(words)) == len(words)  # same-length word types
    assert SyntheticLanguage("rev")("a b  c") == "c  b a"
    assert all(ord(c) > 0x3FF for c in SyntheticLanguage("cyrl")("Abc") )


def test_mixture_shares_and_heldout_parallel_text(tiny_corpus):
    spec = f"mix:eng=0.5,cyrl=0.3,perm2=0.2;base={tiny_corpus}"
    corpus = mixture_corpus(spec)
    chars = {}
    for w in corpus.train:
        chars[w.source] = chars.get(w.source, 0) + len(w.text)
    total = sum(chars.values())
    shares = {"eng": 0.5, "cyrl": 0.3, "perm2": 0.2}
    assert chars.keys() == shares.keys()
    assert all(abs(chars[k] / total - v) < 0.07 for k, v in shares.items())  # a few hundred paragraphs: sampling noise
    pc = heldout_parallel(spec)
    eng = pc.english.articles
    for code in ("cyrl", "perm2"):
        lang = pc.languages[code]
        assert lang.articles.keys() == eng.keys()
        assert all(SyntheticLanguage(code).invert(lang.articles[k]) == eng[k] for k in eng)
    train_text = "\n".join(w.text for w in corpus.train)
    assert not any(u in train_text for u in list(eng.values())[:10])  # held out


@pytest.mark.parametrize("spec", ["mix:eng=0.4,perm1=0.28,perm2=0.16,perm3=0.09,perm4=0.045,perm5=0.02,perm6=0.005",
                                  "mix:eng=0.5,cyrl=0.3,rev+perm12=0.2"])
def test_mixture_shares_are_the_asked_ones(spec):
    """Measured in the built mixture (characters per language, joining blank lines included) on the bundled
    corpus: training within 1 % (relative) of every asked share, down to 0.005; validation (1.5 M
    characters) within 1 % for shares ≥ 0.02 and 2 % for 0.005 (7,800 characters, ~30 paragraphs)."""
    corpus = mixture_corpus(spec)
    asked = {c.name: c.share for c in parse_mixture(spec)}
    for split, works in (("train", corpus.train), ("val", corpus.val)):
        chars = dict.fromkeys(asked, 0)
        for w in works:
            chars[w.source] += len(w.text)
        measured = {k: v / sum(chars.values()) for k, v in chars.items()}
        for k, share in asked.items():
            tol = 0.01 if split == "train" or share >= 0.02 else 0.02
            assert abs(measured[k] / share - 1) <= tol, (split, k, measured[k], share)


def test_mixture_with_a_corpus_the_user_brings(tiny_corpus, tmp_path):
    user = tmp_path / "mine.txt"
    user.write_text(load_corpus("english").val[1].text[:120_000])
    corpus = mixture_corpus(f"mix:eng=0.6,grek=0.2,{user}=0.2;base={tiny_corpus}")
    chars = {}
    for w in corpus.train:
        chars[w.source] = chars.get(w.source, 0) + len(w.text)
    english = sum(len(w.text) for w in load_corpus(str(tiny_corpus)).train)
    assert chars["mine.txt"] == round(0.2 * english)  # exactly its share of the English training characters
    assert set(chars) == {"eng", "grek", "mine.txt"}
    with pytest.raises(WorkbenchError, match="fewer than its share needs"):
        mixture_corpus(f"mix:eng=0.1,{user}=0.9;base={tiny_corpus}")
    pc = heldout_parallel(f"mix:eng=0.6,grek=0.2,{user}=0.2;base={tiny_corpus}")
    assert set(pc.languages) == {"eng", "grek"}  # a user corpus has no parallel text


@pytest.mark.parametrize("spec, message", [
    ("mix:eng=0.5,cyrl=0.4", "sum to 0.9"),
    ("mix:eng=0.5,xyz=0.5", "unknown mixture language"),
    ("mix:eng=0.5,eng=0.5", "twice"),
    ("mix:eng=half", "not a number"),
    ("mix:eng=0.5,cyrl+grek=0.5", "two transforms of one kind"),
])
def test_bad_mixtures(spec, message):
    with pytest.raises(WorkbenchError, match=message):
        parse_mixture(spec)


def test_mixture_study_end_to_end(tmp_path, tiny_corpus):
    table, summary = mixture_study(tmp_path, ("script",), ("pre-ln",), steps=4, model_overrides=TINY_MODEL,
                                   train_overrides=TINY_TRAIN, base=str(tiny_corpus), progress=False)
    assert sorted(table["share"]) == sorted([0.28, 0.16, 0.09, 0.045, 0.02, 0.005])
    assert len(summary) == 1 and -1 <= summary.loc[0, "spearman_score_vs_log_share"] <= 1
    assert (tmp_path / "mixture_summary.csv").is_file()
    assert mixture_spec("vocabulary").startswith("mix:eng=0.4,perm1=0.28,")


def test_hugging_face_model_through_transformer_bridge(llama_dir):
    m = workbench.load(llama_dir)
    tm = text_model(m)
    assert tm.bos == 0 and tm.n_layers == 2
    a = encode_texts(tm, TEXTS, "last", batch_tokens=4096)
    b = encode_texts(tm, TEXTS, "last", batch_tokens=1)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5) and torch.allclose(a.nll, b.nll, atol=1e-4)
    r = rank_languages(m, "udhr", ["sco", "ita"], max_units=4)
    assert len(r["languages"]) == 2 and len(r["languages"][0]["per_layer"]) == 2


def _udhr_rows():
    from workbench.texts import bundled_path, read_jsonl_xz

    return read_jsonl_xz(bundled_path("udhr.jsonl.xz"))


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_json_and_html(run_path, tmp_path, capsys):
    out = tmp_path / "rank.json"
    code, stdout, err = run(["rank-languages", str(run_path), "--langs", "sco,ita,fra", "--max-units", "5",
                             "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert {"model", "corpus", "pooling", "unit", "languages", "spearman_score_vs_bits_per_english_byte"} <= set(r)
    assert {"code", "name", "score", "per_layer", "bits_per_byte", "bits_per_english_byte"} <= set(r["languages"][0])
    assert out.with_suffix(".html").read_text().count("plotly") > 10 and "sco" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--langs", "xx"], "not in corpus"),
    (["--langs", "fra", "--unit", "paragraph"], "aligned_with_english"),
    (["--corpus", "mix:eng=0.6,cyrl=0.6"], "sum to 1.2"),
    (["--pooling", "max"], "unknown pooling"),
])
def test_cli_bad_input(run_path, tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    code, _, err = run(["rank-languages", str(run_path), "--out", str(out), *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".html").exists()


def test_cli_corpus_without_english_and_model_without_tokenizer(run_path, llama_dir, tmp_path, capsys):
    path = tmp_path / "no_eng.jsonl"
    path.write_text(json.dumps({"code": "fra", "name": "French", "articles": {"1": "Tous les êtres humains"}}) + "\n")
    code, _, err = run(["rank-languages", str(run_path), "--corpus", str(path)], capsys)
    assert code == 2 and "no English" in err
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    (bare / "special_tokens_map.json").unlink(missing_ok=True)
    code, _, err = run(["rank-languages", str(bare), "--langs", "ita"], capsys)
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1
