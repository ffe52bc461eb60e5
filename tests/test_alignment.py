"""Language Ranker validation (issue #15): retrieval against hand-computed similarity matrices and its chance
level, partial Spearman against an independent formula, the pooling formulas and the length-matched cut
against truncated texts, identical texts scoring 1, and the CLI's bad input for the new options."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, save_run, scale_gpt
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.corpus_spec import load_corpus
from workbench.languages.alignment import cosine, cosine_interval, partial_spearman, retrieval_hits, spearman
from workbench.languages.encode import POOLINGS, encode_texts, text_model
from workbench.languages.aligned import Language, ParallelCorpus
from workbench.languages.parallel import load_parallel
from workbench.languages.ranker import encode_languages, rank_languages, score_languages
from workbench.model import GPT
from workbench.tokenizer import train_tokenizer

N_CTX = 128  # the shortest UDHR articles fit whole, so a length-matched cut is a real cut


@pytest.fixture(scope="module")
def model(tiny_corpus):
    """A random pre-LN model far from linear (``scale_gpt``): it distinguishes texts token by token, which is
    all these properties need; training would only cost time."""
    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), TINY_MODEL["d_vocab"])
    return scale_gpt(GPT(ModelConfig(norm="pre-ln", **{**TINY_MODEL, "n_ctx": N_CTX}), tok))


@pytest.fixture(scope="module")
def english():
    """The 8 shortest English UDHR articles."""
    eng = load_parallel("udhr").english
    keys = sorted(eng.articles, key=lambda k: len(eng.articles[k]))[:8]
    return {k: eng.articles[k] for k in keys}


def corpus(english: dict[str, str], **languages: dict[str, str]) -> ParallelCorpus:
    langs = {"eng": Language("eng", "English", articles=english)}
    langs.update({c: Language(c, c, articles=a) for c, a in languages.items()})
    return ParallelCorpus("test", langs)


# --- retrieval against hand-computed similarity matrices ---------------------------------------------------

def test_retrieval_hits_on_a_hand_computed_matrix():
    """English units are the basis vectors, so sim[i, j] = x_i[j] / |x_i|; integer rows with integer norms make
    every cosine exact, so the tie below is an exact tie.

        layer 0     e0     e1     e2     e3
        x0         4/5    0      0      3/5    diagonal strict max of row and column: aligned
        x1         0      4/5    0      3/5    row max, but 12/13 beats it in column 1: not aligned
        x2         0      12/13  5/13   0      column max, not row max: not aligned
        x3         2/3    1/3    0      2/3    column max, ties 2/3 in its row: strict, not aligned

    Layer 1 is the identity (every unit aligned), so a layer/unit transpose shows too."""
    x0 = torch.tensor([[4, 0, 0, 3], [0, 4, 0, 3], [0, 12, 5, 0], [2, 1, 0, 2]], dtype=torch.float32)
    e0 = torch.eye(4)
    x, e = torch.stack([x0, torch.eye(4)], dim=1), torch.stack([e0, torch.eye(4)], dim=1)
    sim = x0 / x0.norm(dim=1, keepdim=True)
    assert sim[3, 0] == sim[3, 3]  # the tie is exact in float32
    hits = retrieval_hits(x, e, center=False)
    assert hits.shape == (4, 2) and hits.dtype == torch.bool
    assert hits[:, 0].tolist() == [True, False, False, False]
    assert hits[:, 1].tolist() == [True, True, True, True]


def test_retrieval_centering_removes_a_language_wide_offset():
    """English at 0°, 90°, 180°, 270° (mean zero); X is the same plus a language-wide offset (10, 0).

    Centered, X is English again: every unit aligned. Raw, X = (11,0), (10,1), (9,0), (10,−1):
        row 0: cos = [1, 0, −1, 0] — row max, but x2 = (9,0) also has cos 1 with e0: a tie in column 0
        rows 1, 3: cos with e0 = 10/√101 ≈ 0.995 beats the diagonal ±1/√101
        row 2: diagonal −1
    so no unit is aligned. An offset on the English side is removed by centering too."""
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])[:, None, :]  # [unit, layer, d]
    x = v + torch.tensor([10.0, 0.0])
    assert retrieval_hits(x, v, center=True)[:, 0].tolist() == [True] * 4
    assert retrieval_hits(x, v, center=False)[:, 0].tolist() == [False] * 4
    assert retrieval_hits(x, v + torch.tensor([0.0, 5.0]), center=True)[:, 0].tolist() == [True] * 4


@pytest.mark.parametrize("n", [3, 8])
def test_retrieval_of_unrelated_representations_is_chance(n):
    """With i.i.d. isotropic representations the 2n − 1 cosines of unit i's row and column are i.i.d. (a tree of
    independent random directions), so unit i is aligned with probability 1/(2n − 1). Every layer is an
    independent trial; a layer's mean over units has variance at most p(1 − p), so 4 standard errors of
    L trials bound the error. Counting row maxima only would give 1/n; either max, about 2/n."""
    layers = 20_000
    g = torch.Generator().manual_seed(n)
    x, e = torch.randn(n, layers, 8, generator=g), torch.randn(n, layers, 8, generator=g)
    p = 1 / (2 * n - 1)
    rate = retrieval_hits(x, e, center=False).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / layers), (rate, p)


def test_cosine_interval_against_a_loop_over_resamples():
    """The same resamples (same generator) one at a time, centering redone on each: the interval's quantiles."""
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(7, 3, 5, generator=g) + 2, torch.randn(7, 3, 5, generator=g)
    for center in (True, False):
        idx = torch.randint(0, 7, (200, 7), generator=torch.Generator().manual_seed(11))
        scores = torch.tensor([cosine(x[i], e[i], center).mean().item() for i in idx], dtype=torch.float64)
        ref = [float(np.quantile(scores.numpy(), q)) for q in (0.025, 0.975)]
        assert cosine_interval(x, e, center, seed=11) == pytest.approx(ref, abs=1e-6)


# --- through the Ranker: identical texts, shuffled pairings, length matching -------------------------------

def test_identical_texts_score_one(model, english):
    le = encode_languages(model, corpus(english, copy=dict(english)), ["copy"], poolings=POOLINGS)
    for pooling in POOLINGS:
        for center in ("none", "language"):
            row = score_languages(le, pooling, center=center, metric="both")["languages"][0]
            assert row["retrieval_per_layer"] == [1.0, 1.0] and row["retrieval"] == 1.0, (pooling, center)
            assert row["retrieval_ci95"] == [1.0, 1.0] and row["retrieval_chance"] == pytest.approx(1 / 15)
            if center == "none":
                assert np.allclose(row["per_layer"], 1.0, atol=1e-5), (pooling, row["per_layer"])


def test_shuffled_pairing_scores_at_most_chance(model, english):
    """A near-copy of English (lower case) is retrieved almost perfectly when aligned; paired with another
    unit's English, its true translation sits off the diagonal, so retrieval falls to chance or below."""
    pc = corpus(english, lower={k: t.lower() for k, t in english.items()})
    aligned = rank_languages(model, pc, ["lower"], pooling="mean")["languages"][0]
    shuffled = rank_languages(model, pc, ["lower"], pooling="mean", pairing="shuffled")["languages"][0]
    chance = 1 / (2 * len(english) - 1)
    assert aligned["retrieval_ci95"][0] > 0.5  # the model can tell the units apart
    assert shuffled["retrieval_chance"] == pytest.approx(chance)
    assert shuffled["retrieval_ci95"][0] <= chance and shuffled["retrieval"] <= chance + 1e-9


def _prefix_languages(model, english):
    """'longer': English plus a sentence; 'shorter': English cut after its first half of words. Either way one
    text's tokens are a prefix of the other's (checked), so cut to their common length they are identical."""
    tok = model.tokenizer
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    longer = {k: t + " Everyone agrees." for k, t in english.items()}
    shorter = {k: " ".join(t.split(" ")[: max(1, len(t.split(" ")) // 2)]) for k, t in english.items()}
    for k, t in english.items():
        assert ids(longer[k])[: len(ids(t))] == ids(t) and len(ids(longer[k])) > len(ids(t))
        assert ids(t)[: len(ids(shorter[k]))] == ids(shorter[k]) and len(ids(shorter[k])) < len(ids(t))
    return longer, shorter


def test_length_matched_prefixes_and_copies_score_one(model, english):
    longer, shorter = _prefix_languages(model, english)
    pc = corpus(english, copy=dict(english), longer=longer, shorter=shorter)
    le = encode_languages(model, pc, ["copy", "longer", "shorter"], poolings=POOLINGS, length_match=True)
    for pooling in POOLINGS:
        r = score_languages(le, pooling, center="none")
        assert r["length_matched"] is True
        for row in r["languages"]:
            assert row["retrieval"] == 1.0, (pooling, row["code"])
            assert np.allclose(row["per_layer"], 1.0, atol=1e-5), (pooling, row["code"], row["per_layer"])
        raw = {row["code"]: row for row in score_languages(le, pooling, center="none", matched=False)["languages"]}
        for code in ("longer", "shorter"):  # without the cut the texts differ: the control is doing the work
            assert min(raw[code]["per_layer"]) < 0.999, (pooling, code)
        assert np.allclose(raw["copy"]["per_layer"], 1.0, atol=1e-5)


@torch.no_grad()
def test_length_matched_cosine_against_manual_truncation(model):
    """Italian against English, mean pooling, no centering: both sides cut by hand to min(tokens) and run alone."""
    r = rank_languages(model, "udhr", ["ita"], pooling="mean", max_units=4, center="none", metric="cosine",
                       length_match=True)
    pc = load_parallel("udhr")
    pairs = [p for p in pc.pairs(pc.languages["ita"], "article") if p[0] in r["units"]]
    tok = model.tokenizer
    cos = torch.zeros(len(pairs), model.cfg.n_layers)
    cut_something = False
    for u, (_, eng, ita) in enumerate(pairs):
        a, b = tok.encode(ita, add_special_tokens=False).ids, tok.encode(eng, add_special_tokens=False).ids
        c = min(len(a), len(b), N_CTX - 1)
        cut_something |= len(a) != len(b)
        reps = []
        for ids in (a, b):
            _, cache = model.run_with_cache(torch.tensor([[model.bos_token_id] + ids[:c]]))
            reps.append(torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, 1:].mean(0)
                                     for l in range(model.cfg.n_layers)]))
        cos[u] = F.cosine_similarity(reps[0], reps[1], dim=-1)
    assert cut_something
    assert np.allclose(r["languages"][0]["per_layer"], cos.mean(0).numpy(), atol=1e-5)


# --- pooling: formulas and the cut against truncated texts --------------------------------------------------

TEXTS = ["Everyone has the right to freedom of thought, conscience and religion.",
         "All human beings are born free and equal in dignity and rights."]


def _reference_pool(resid: torch.Tensor, pooling: str) -> torch.Tensor:
    """resid: [pos, d] of one text, position 0 the start token. weighted: Σ p·x_p / Σ p over p = 1..n."""
    body = resid[1:]
    if pooling == "last":
        return body[-1]
    if pooling == "mean":
        return body.mean(0)
    w = torch.arange(1, len(body) + 1, dtype=body.dtype)
    return (w[:, None] * body).sum(0) / w.sum()


def _close(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@torch.no_grad()
def test_poolings_match_the_formulas_on_the_hook_cache(model):
    tm = text_model(model)
    enc = encode_texts(tm, TEXTS, POOLINGS)
    for i, t in enumerate(TEXTS):
        _, cache = model.run_with_cache(torch.tensor([[model.bos_token_id] + tm.tokenize(t)]))
        for p in POOLINGS:
            for layer in range(model.cfg.n_layers):
                ref = _reference_pool(cache[f"blocks.{layer}.hook_resid_post"][0], p)
                assert _close(enc.by_pooling[p][i, layer], ref), (p, i, layer)
    assert torch.equal(enc.pooled, enc.by_pooling["last"])


@torch.no_grad()
def test_pooling_at_a_cut_equals_the_truncated_text(model):
    """Cuts for three texts of different lengths in one batch (including c = n, the whole text), against the
    same token prefixes encoded on their own (one text per pass: no padding) and against the hook cache."""
    tm = text_model(model)
    texts = ["No one shall be held in slavery.", *TEXTS]  # shortest first: batch rows are not text indices
    ids = [tm.tokenize(t) for t in texts]
    assert len(ids[0]) < min(len(ids[1]), len(ids[2]))
    cuts = {0: {2, 4}, 1: {1, 5, len(ids[1])}, 2: {2, 9}}
    enc = encode_texts(tm, texts, POOLINGS, cuts=cuts)
    assert set(enc.at_cut) == {(p, i, c) for p in POOLINGS for i, cs in cuts.items() for c in cs}
    table = {f"{i}:{c}": ids[i][:c] for i, cs in cuts.items() for c in cs}
    alone = encode_texts(dataclasses.replace(tm, tokenize=table.__getitem__), list(table), POOLINGS, batch_tokens=1)
    for k, key in enumerate(table):
        i, c = map(int, key.split(":"))
        _, cache = model.run_with_cache(torch.tensor([[model.bos_token_id] + ids[i][:c]]))
        for p in POOLINGS:
            assert _close(enc.at_cut[p, i, c], alone.by_pooling[p][k]), (p, i, c)
            for layer in range(model.cfg.n_layers):
                ref = _reference_pool(cache[f"blocks.{layer}.hook_resid_post"][0], p)
                assert _close(enc.at_cut[p, i, c][layer], ref), (p, i, c, layer)


# --- partial Spearman ---------------------------------------------------------------------------------------

def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (written out, not pandas)."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        same = v == value
        r[same] = r[same].mean()
    return r


def _partial_by_residuals(x, y, z) -> float:
    """The partial correlation as the Pearson r of the rank residuals after regressing each on rank(z)."""
    rx, ry, rz = _ranks(x), _ranks(y), _ranks(z)
    design = np.column_stack([np.ones_like(rz), rz])
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    return float(np.corrcoef(res[0], res[1])[0, 1])


def test_partial_spearman_against_rank_residuals():
    rng = np.random.default_rng(0)
    for _ in range(5):
        z = rng.normal(size=15)
        x, y = z + rng.normal(size=15), z + rng.normal(size=15)
        x[3] = x[7]  # a tie
        assert partial_spearman(x, y, z) == pytest.approx(_partial_by_residuals(x, y, z), abs=1e-10)
    with_nan = [*x, np.nan], [*y, 5.0], [*z, 1.0]  # an incomplete point is dropped
    assert partial_spearman(*with_nan) == pytest.approx(_partial_by_residuals(x, y, z), abs=1e-10)
    assert math.isnan(partial_spearman([1, 2, 3], [3, 1, 2], [2, 3, 1]))  # below 4 points


def test_partial_spearman_removes_a_common_driver():
    """x and y both follow z only: strongly rank-correlated, but nothing is left once z is held fixed."""
    rng = np.random.default_rng(1)
    z = rng.uniform(size=2000)
    x, y = z + rng.uniform(-0.02, 0.02, 2000), z + rng.uniform(-0.02, 0.02, 2000)
    assert spearman(x, y) > 0.95
    assert abs(partial_spearman(x, y, z)) < 0.1
    w = rng.uniform(size=2000)  # y also follows something z does not explain: the partial stays large
    assert partial_spearman(x + w, y + w, z) > 0.5


# --- CLI --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    return save_run(model, tmp_path_factory.mktemp("alignment") / "run")


@pytest.mark.parametrize("extra, message", [
    (["--metric", "mexa"], "unknown metric 'mexa'; choose one of: cosine, retrieval, both"),
    (["--pooling", "max"], "unknown pooling 'max'; choose one of: last, mean, weighted"),
    (["--max-units", "1", "--metric", "retrieval", "--center", "none"], "retrieval needs at least two"),
    (["--max-units", "1", "--metric", "both", "--center", "none"], "retrieval needs at least two"),
    (["--max-units", "1", "--metric", "retrieval"], "retrieval and centering need at least two"),
])
def test_cli_bad_metric_pooling_and_single_unit(run_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    code = main(["rank-languages", str(run_dir), "--langs", "ita", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("workbench: error:") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not out.with_suffix(".html").exists()


def test_cli_cosine_on_a_single_unit_without_centering(run_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["rank-languages", str(run_dir), "--langs", "ita", "--max-units", "1", "--metric", "cosine",
                 "--center", "none", "--pooling", "weighted", "--length-match", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    row = r["languages"][0]
    assert r["metric"] == "cosine" and r["pooling"] == "weighted" and r["length_matched"] is True
    assert row["n_units"] == 1 and "retrieval" not in row and len(row["per_layer"]) == TINY_MODEL["n_layers"]
