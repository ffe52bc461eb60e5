"""`remove-ln` when it cannot finish: a diverging fine-tune (more than 5 non-finite steps in a row) is
one line, exit 2, nothing written; up to 5 in a row are skipped, not fatal; a fold of norms that are
not affine yet is refused in one line."""

import json
import math

import pytest
import torch

from conftest import TINY_MODEL, save_run, scale_gpt
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.model import GPT
from workbench.norms.frozen import FrozenStandardize, SpecialPositions
from workbench.norms.handover import handover
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal.gpt_sites import GPTRemoval
from workbench.tokenizer import train_tokenizer

# float32 whatever the CPU (the default is auto): these tests compare exact arithmetic
RC = dict(steps_per_ln=1, tokens_per_step=64, eval_batches=2, eval_batch_size=4, dtype="float32", warmup_steps=1, control=False)
STEPS = 3 * TINY_MODEL["n_layers"] + 2 + 6  # one step per norm and the special positions, then 6 cool-down


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus):
    tok = train_tokenizer((p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))), TINY_MODEL["d_vocab"])
    return scale_gpt(GPT(ModelConfig(norm="pre-ln", **TINY_MODEL), tok))


@pytest.fixture(scope="module")
def source_run(source, tmp_path_factory):
    return save_run(source, tmp_path_factory.mktemp("pre-ln"))


def poison(monkeypatch, bad_steps: set[int]) -> None:
    """The training loss of the given optimizer steps (1-based) is NaN, as an overflow makes it; the
    evaluation and calibration passes (no gradient) are left alone."""
    import workbench.removal.finetune as ft

    real, seen = ft.lm_cross_entropy, []

    def loss(logits, tokens):
        out = real(logits, tokens)
        if not torch.is_grad_enabled():
            return out
        seen.append(1)
        return out * float("nan") if len(seen) in bad_steps else out

    monkeypatch.setattr(ft, "lm_cross_entropy", loss)


def nothing_written(out) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_five_non_finite_steps_in_a_row_are_skipped_and_the_count_restarts(source, tmp_path, tiny_corpus,
                                                                          monkeypatch):
    bad = {2, 3, 4, 5, 6} | {8, 9, 10, 11, 12}  # 5 in a row, one good step, 5 in a row again
    poison(monkeypatch, bad)
    out = tmp_path / "free"
    s = remove_ln(source, out, RemovalConfig.of(**RC, final_steps=6), corpus=str(tiny_corpus), progress=False)
    assert s["steps"] == STEPS and s["skipped_steps"] == len(bad)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in metrics if m.get("skipped")} == bad
    assert all(m["loss"] == m["loss"] for m in metrics if m["step"] not in bad)  # NaN only where poisoned
    assert math.isfinite(s["ce_ln_free"])  # a NaN update applied even once would make every weight NaN


def test_six_non_finite_steps_in_a_row_abort_and_write_nothing(source, tmp_path, tiny_corpus, monkeypatch):
    poison(monkeypatch, {2, 3, 4, 5, 6, 7})
    out = tmp_path / "free"
    with pytest.raises(WorkbenchError, match=r"diverged at step 7 \(.*\): 6 non-finite losses or gradients in a row"):
        remove_ln(source, out, RemovalConfig.of(**RC, final_steps=6), corpus=str(tiny_corpus), progress=False)
    assert nothing_written(out)


def test_a_diverging_cli_run_is_one_line_exit_2_and_writes_nothing(source_run, tmp_path, tiny_corpus, capsys):
    """A learning rate that overflows the weights after one step: every later loss is non-finite."""
    out = tmp_path / "free"
    code = main(["remove-ln", str(source_run), "--out", str(out), "--steps-per-ln", "1", "--tokens-per-step", "64",
                 "--lr", "1e30", "--corpus", str(tiny_corpus), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("workbench: error: the fine-tune diverged"), err
    # the weights overflow after one step: the next calibration already sees it, or the next 6 losses do
    assert "the model overflows on the calibration batch" in err or "6 non-finite losses or gradients in a row" in err
    assert err.rstrip().endswith("lower --lr or raise --steps-per-ln")
    assert nothing_written(out)


def test_remove_ln_without_a_tokenizer_is_refused_before_anything_is_written(tmp_path):
    m = scale_gpt(GPT(ModelConfig(norm="pre-ln", **TINY_MODEL)))
    with pytest.raises(WorkbenchError, match="the model has no tokenizer"):
        remove_ln(m, tmp_path / "free", RemovalConfig.of(**RC), progress=False)
    assert nothing_written(tmp_path / "free")


def _frozen(site, **kw) -> FrozenStandardize:
    return FrozenStandardize(2.0, site.norm.standardize.centers, **kw)


def refused(adapter, match: str) -> None:
    with pytest.raises(WorkbenchError, match=match) as e:
        adapter.fold()
    assert "\n" not in str(e.value)


def test_fold_refuses_norms_that_are_not_affine_yet(source):
    """Folding needs every norm frozen at one σ, special positions off and any --bridge hand-over done."""
    adapter = GPTRemoval(source)
    *frozen, last = adapter.sites
    for site in frozen:
        site.norm.standardize = _frozen(site)
    refused(adapter, r"^ln_final still normalizes by a live statistic \(LayerStandardize\).*freeze its scale first")
    last.norm.standardize = _frozen(last, positions=SpecialPositions(eot_id=0), sigma_bos=5.0)
    refused(adapter, "^ln_final still keeps its own BOS/EOT scale; switch the special positions off first")
    last.norm.standardize.special = False
    last.norm.standardize.handover = handover("ramp", 4)
    last.norm.standardize.progress = 0.5
    refused(adapter, r"^ln_final is still being handed over from its live scale \(--bridge ramp\)")
    last.norm.standardize.progress = 1.0
    folded = adapter.fold()
    t = torch.randint(0, TINY_MODEL["d_vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = adapter.net(t)
        assert (folded(t) - ref).abs().max() <= 1e-5 * ref.abs().max()
