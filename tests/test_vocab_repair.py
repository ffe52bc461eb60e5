"""`repair-vocab`: the ratios against the activation cache, the repaired set against a brute-force scan, the
rows it leaves alone, and the directory it writes (stock reload, control, summary), on a norm-free tiny Llama
behind the exact sink prefix (what SmolLM2's runs are)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import workbench
from workbench.cli import main
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal.repair import VocabRepair, repair_vocab, text_rms, token_ratios, window_sources

PLANT = 7.0  # a row this many times larger runs away (the tiny model's text stays below 4× its RMS)


@pytest.fixture(scope="module")
def free_run(hf_dirs, tmp_path_factory, tiny_corpus):
    rc = RemovalConfig.of(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, warmup_steps=1,
                          sink_prefix=True)
    out = tmp_path_factory.mktemp("repair") / "free"
    remove_ln(hf_dirs["llama"], out, rc, corpus=str(tiny_corpus), progress=False)
    return out


def _text(model, tiny_corpus):
    from workbench.batches import load_token_data

    data = load_token_data(str(tiny_corpus), model.cfg.d_vocab, tokenizer=model.tokenizer)
    return [data.train_batch(i, 4, 24, 1) for i in range(2)]


def _ratios_from_cache(model, windows, scale):
    """Per window, the largest over blocks of the last position's RMS / scale, from ``hook_resid_post``."""
    _, cache = model.run_with_cache(windows, names_filter=lambda n: n.endswith("hook_resid_post"))
    rms = torch.stack([cache[f"blocks.{k}.hook_resid_post"][:, -1].float().pow(2).mean(-1).sqrt() / scale[k]
                       for k in range(model.cfg.n_layers)])
    return torch.nan_to_num(rms, nan=torch.inf).amax(0)


def test_ratios_and_text_scale_equal_the_cache_written_out(free_run, tiny_corpus):
    model = workbench.load(free_run)
    text = _text(model, tiny_corpus)
    _, cache = model.run_with_cache(torch.cat(text), names_filter=lambda n: n.endswith("hook_resid_post"))
    want = torch.stack([cache[f"blocks.{k}.hook_resid_post"].float().pow(2).mean(-1).sqrt().flatten().median()
                        for k in range(model.cfg.n_layers)])  # behind the prefix the hooks start at position 1
    scale = text_rms(model, text)
    torch.testing.assert_close(scale, want, rtol=1e-5, atol=0)
    ids = torch.tensor([3, 50, 111, 250])
    prefix = text[0][0, :4]
    windows = torch.cat([prefix.expand(len(ids), -1), ids[:, None]], 1)
    torch.testing.assert_close(token_ratios(model, ids, prefix, scale, batch=3), _ratios_from_cache(model, windows, scale),
                               rtol=1e-5, atol=0)


def _planted(free_run, tiny_corpus, token: int, factor: float = PLANT):
    model = workbench.load(free_run)
    text = _text(model, tiny_corpus)
    assert token not in text[0][0, :4].tolist()
    with torch.no_grad():
        model.embed.W_E[token] *= factor
    return model, text


def test_repair_shrinks_exactly_the_runaways_a_brute_force_scan_finds(free_run, tiny_corpus):
    token = 200
    model, text = _planted(free_run, tiny_corpus, token)
    w0 = model.embed.W_E.detach().clone()
    scale = text_rms(model, text)
    prefixes = [text[0][0, :1], text[0][0, :4]]
    every = torch.arange(model.cfg.d_vocab)
    worst = lambda: torch.stack([_ratios_from_cache(model, torch.cat([p.expand(len(every), -1), every[:, None]], 1),  # noqa: E731
                                                    scale) for p in prefixes]).amax(0)
    expected = set((worst() > 4.0).nonzero().flatten().tolist())
    assert token in expected and len(expected) < model.cfg.d_vocab // 4
    report = repair_vocab(model, text, VocabRepair(threshold=4.0, random_windows=0))
    rows = {r["token"]: r for r in report["tokens"]}
    assert set(rows) == expected and report["converged"]
    after = worst()
    assert (after <= 4.0).all()
    for t, r in rows.items():  # each row shrunk by powers of 1/2 (exact), and by no more than it needed
        assert torch.equal(model.embed.W_E[t], w0[t] * r["factor"])
        assert r["ratio_after"] == pytest.approx(after[t].item(), rel=1e-5)
        with torch.no_grad():
            model.embed.W_E[t] = w0[t] * r["factor"] * 2  # one round fewer: still over the threshold
            assert max(_ratios_from_cache(model, torch.cat([q, torch.tensor([t])])[None], scale).item()
                       for q in prefixes) > 4.0
            model.embed.W_E[t] = w0[t] * r["factor"]
    untouched = torch.tensor([t for t in range(model.cfg.d_vocab) if t not in rows])
    assert torch.equal(model.embed.W_E[untouched], w0[untouched])


def test_window_sources_name_the_token_where_a_runaway_starts_not_where_it_is_copied(free_run, tiny_corpus):
    token = 200
    model, text = _planted(free_run, tiny_corpus, token, factor=1.0)
    scale = text_rms(model, text)
    w = text[0][:1].clone()
    own = max((o[0].float().pow(2).mean(-1).sqrt() / s).max().item() for o, s in zip(model.block_outputs(w), scale))
    threshold = 1.5 * own  # the window's own text stays below it
    assert window_sources(model, w, scale, threshold) == []
    with torch.no_grad():
        model.embed.W_E[token] *= 20 * threshold
    w[0, 5] = token
    assert window_sources(model, w, scale, threshold) == [token]


def test_a_protected_token_is_passed_over_and_the_blame_falls_on_the_next_source(free_run, tiny_corpus):
    model, text = _planted(free_run, tiny_corpus, 200, factor=1.0)
    scale = text_rms(model, text)
    w = text[0][:1].clone()
    threshold = 1.5 * max((o[0].float().pow(2).mean(-1).sqrt() / s).max().item()
                          for o, s in zip(model.block_outputs(w), scale))
    hot, later = 200, 201  # both run away; the protected one sits first
    with torch.no_grad():
        model.embed.W_E[[hot, later]] *= 20 * threshold
    w[0, 3], w[0, 8] = hot, later
    protected = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    assert window_sources(model, w, scale, threshold, protected) == [hot]
    protected[w[0]] = True  # every id of the window but one: attention copies `hot` to the positions between
    protected[later] = False
    assert window_sources(model, w, scale, threshold, protected) == [later]
    protected[later] = True
    assert window_sources(model, w, scale, threshold, protected) == []


def test_protection_spares_only_the_random_windows_blame(free_run, tiny_corpus):
    """A corpus token that runs away on its own after the first token is still shrunk; the count of protected
    ids is the corpus's own, counted here directly."""
    from collections import Counter

    from workbench.batches import load_token_data

    model, text = _planted(free_run, tiny_corpus, 200, factor=1.0)
    data = load_token_data(str(tiny_corpus), model.cfg.d_vocab, tokenizer=model.tokenizer)
    seen = Counter(data.train.tolist())
    often = [t for t, n in seen.most_common() if n >= 8 and t not in text[0][0, :4].tolist()]
    with torch.no_grad():
        model.embed.W_E[often[0]] *= PLANT
    counts = torch.tensor([seen.get(t, 0) for t in range(model.cfg.d_vocab)])
    report = repair_vocab(model, text, VocabRepair(random_windows=4), counts)
    assert report["protected"] == sum(n >= 8 for n in seen.values())
    rows = {r["token"]: r for r in report["tokens"]}
    assert rows[often[0]]["found_by"] == "after the first token"
    assert not any(r["found_by"] == "random windows" and seen.get(t, 0) >= 8 for t, r in rows.items())


def test_repair_vocab_writes_a_directory_stock_transformers_reloads_at_its_summary(free_run, tiny_corpus, tmp_path,
                                                                                    capsys):
    from workbench.loader import export

    token = 200
    model, text = _planted(free_run, tiny_corpus, token)
    planted = tmp_path / "planted"
    export(model, planted, text[0][:2])  # checked on text: random tokens run away (what the repair is for)
    for extra in ("summary.json", "control"):
        (shutil.copytree if (free_run / extra).is_dir() else shutil.copy2)(free_run / extra, planted / extra)
    assert main(["repair-vocab", str(planted), "--out", str(tmp_path / "fixed"), "--random-windows", "4"]) == 0
    s = json.loads((tmp_path / "fixed" / "summary.json").read_text())
    rows = {r["token"]: r for r in s["vocab_repair"]["tokens"]}
    assert token in rows and s["vocab_repair"]["threshold"] == 4.0
    assert s["ce_stock_reload"] == pytest.approx(s["ce_ln_free"], abs=1e-4)
    fixed = workbench.load(tmp_path / "fixed")
    torch.testing.assert_close(fixed.embed.W_E[token], model.embed.W_E[token] * rows[token]["factor"], rtol=1e-6, atol=0)
    assert (tmp_path / "fixed" / "control" / "model.safetensors").is_file()
    assert s["ce_ln_free_minus_control"] == pytest.approx(s["ce_ln_free"] - s["ce_control"])
    original = workbench.load(s["source"])  # the KL is the repaired model's, not the source run's
    from workbench.batches import load_token_data

    val = load_token_data(s["corpus"], fixed.cfg.d_vocab, tokenizer=fixed.tokenizer).val_batches(2, 4, s["n_ctx"])
    def kl(teacher) -> float:
        per = [torch.nn.functional.kl_div(fixed(b).float().log_softmax(-1), teacher(b).float().log_softmax(-1),
                                          log_target=True, reduction="none").sum(-1).mean().item() for b in val]
        return sum(per) / len(per)

    assert s["kl_ln_free_to_original"] == pytest.approx(kl(original), rel=1e-4)
    assert s["kl_ln_free_to_control"] == pytest.approx(kl(workbench.load(free_run / "control")), rel=1e-4)


def test_the_corpus_search_reads_training_windows_and_blames_their_runaway(free_run, tiny_corpus, tmp_path,
                                                                           monkeypatch):
    """`--corpus-windows N`: the first N windows of the training batches after the two that set the text's
    scale (never a validation window), searched like the random windows; a runaway planted there is shrunk."""
    import workbench.removal.api as api
    from workbench.batches import load_token_data

    seen = {}

    def spy(model, text, cfg, counts=None, corpus=None):
        seen["corpus"], seen["text"] = corpus, text
        return repair_vocab(model, text, cfg, counts, corpus)

    monkeypatch.setattr(api, "repair_vocab", spy)
    api.repair_to_dir(free_run, tmp_path / "r", VocabRepair(random_windows=0, corpus_windows=12))
    n_ctx = json.loads((free_run / "summary.json").read_text())["n_ctx"]
    data = load_token_data(str(tiny_corpus), 256, tokenizer=workbench.load(free_run).tokenizer)
    assert torch.equal(seen["corpus"], torch.cat([data.train_batch(i, 8, n_ctx, 1) for i in (2, 3)])[:12])
    val = {tuple(w.tolist()) for b in data.val_batches(2, 4, n_ctx) for w in b}
    assert not val & {tuple(w.tolist()) for w in seen["corpus"]}
    model, text = _planted(free_run, tiny_corpus, 200, factor=1.0)  # unplanted: the tiny model's own runaways
    first = set(window_sources(model, seen["corpus"], text_rms(model, text), 4.0))
    both = repair_vocab(copy.deepcopy(model), text, VocabRepair(random_windows=0), None, seen["corpus"])
    alone = {r["token"] for r in repair_vocab(copy.deepcopy(model), text, VocabRepair(random_windows=0))["tokens"]}
    by = {r["token"]: r["found_by"] for r in both["tokens"]}
    assert first - alone and all(by[t] == "corpus windows" for t in first - alone)
    assert {t for t, w in by.items() if w != "corpus windows"} == alone  # the contexts' finds are unchanged


@pytest.mark.parametrize("case", ["live norms", "shrink", "protect", "corpus", "not a run"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, free_run, hf_dirs, tmp_path, capsys):
    run = {"live norms": tmp_path / "live", "shrink": free_run, "protect": free_run, "corpus": free_run,
           "not a run": hf_dirs["llama"]}[case]
    if case == "live norms":  # a run directory whose model still has its norms
        shutil.copytree(hf_dirs["llama"], run)
        shutil.copy2(free_run / "summary.json", run / "summary.json")
    extra = {"shrink": ["--shrink", "1.5"], "protect": ["--protect-seen", "-1"],
             "corpus": ["--corpus-windows", "-2"]}.get(case, [])
    assert main(["repair-vocab", str(run), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"live norms": "norm-free", "shrink": "--shrink", "protect": "--protect-seen", "corpus": "--corpus-windows",
            "not a run": "summary.json"}[case] in err
    assert not (tmp_path / "out").exists()


def test_block_outputs_are_the_cache_without_a_prefix(swiglu_run):
    model = workbench.load(swiglu_run)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    outs = model.block_outputs(tokens)
    assert len(outs) == model.cfg.n_layers
    for k, o in enumerate(outs):
        torch.testing.assert_close(o, cache[f"blocks.{k}.hook_resid_post"], rtol=0, atol=0)


def test_sink_windows_random_counts_the_finite_windows_computed_here(free_run, tiny_corpus):
    """`analyses/sink_windows.py --random N`: uniformly random ids behind the corpus windows' first token, a
    window finite when its mean CE is (and below 30); rebuilt and scored here with torch alone."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from workbench.batches import load_token_data

    script = Path(__file__).resolve().parents[1] / "analyses" / "sink_windows.py"
    r = subprocess.run([sys.executable, str(script), str(free_run), "--random", "8", "--corpus", str(tiny_corpus),
                        "--seed", "3"], capture_output=True, text=True, check=True)
    finite, count, ce = re.search(r"(\d+) of (\d+) random-token windows finite \(seed 3\); CE there ([\d.]+)",
                                  r.stdout).groups()
    model = workbench.load(free_run)
    n_ctx = json.loads((free_run / "summary.json").read_text())["n_ctx"]
    first = load_token_data(str(tiny_corpus), model.cfg.d_vocab, tokenizer=model.tokenizer).val_batches(1, 1, n_ctx)[0][0, 0]
    w = torch.randint(0, model.cfg.d_vocab, (8, n_ctx), generator=torch.Generator().manual_seed(3))
    w[:, 0] = first
    with torch.no_grad():
        logits = model(w).float()
    per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), w[:, 1:], reduction="none").mean(1)
    ok = torch.isfinite(per) & (per < 30)
    assert (int(finite), int(count)) == (int(ok.sum()), 8)
    assert float(ce) == pytest.approx(per[ok].mean().item(), abs=1e-3)
