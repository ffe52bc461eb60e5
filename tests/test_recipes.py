"""Removal recipes chosen by capability, resolved in one place, and the CLI generated from the fields."""

import dataclasses
import json

import pytest

import workbench
from conftest import TINY_MODEL, TINY_TRAIN
from workbench.cli import build_parser, main
from workbench.config import ModelConfig
from workbench.errors import WorkbenchError
from workbench.removal import RemovalConfig, remove_ln
from workbench.removal.recipes import RECIPES, resolve

GATED = ModelConfig(norm="pre-rms", mlp="swiglu", act_fn="silu", pos="rope", **{**TINY_MODEL})
GELU = ModelConfig(norm="pre-ln", **TINY_MODEL)


def test_the_recipe_follows_the_mlp_and_flags_and_family_go_on_top():
    rc, source, r = resolve(GELU, {})
    assert r.name == "gpt2" and rc == RemovalConfig.of() and set(source.values()) == {"default"}
    rc, source, r = resolve(GATED, {})
    assert r.name == "gated" and (rc.schedule.split_mlp, rc.losses.mlp_penalty, rc.calibration.special_steps,
                               rc.schedule.steps_per_ln) == (True, 1.0, 16, 4)
    assert source["split_mlp"] == "recipe gated" and source["sigma"] == "default"
    rc, source, _ = resolve(GATED, {"steps_per_ln": 3}, family={"lr": 2e-5, "n_ctx": 128})
    assert (rc.schedule.steps_per_ln, rc.optimization.lr, source["steps_per_ln"], source["lr"]) == (3, 2e-5, "given", "family")
    rc, _, r = resolve(GATED, {}, recipe="gpt2")
    assert r.name == "gpt2" and not rc.schedule.split_mlp
    # every recipe field is a real field, and a recipe is a valid config on a model it applies to
    for recipe in RECIPES.values():
        assert set(recipe.fields) <= {f.name for _, f in RemovalConfig.fields()}
    with pytest.raises(WorkbenchError, match="unknown --recipe 'fast'; choose one of: auto, gpt2, gated"):
        resolve(GATED, {}, recipe="fast")
    with pytest.raises(WorkbenchError, match="--steps-per-ln must be at least 1"):
        resolve(GATED, {"steps_per_ln": 0})


def test_every_flag_is_its_field_with_its_default_written_once():
    """Unset flags are absent (the recipe decides them); a set flag is the field, typed as the field."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["remove-ln"]
    fields = {f.name: f for _, f in RemovalConfig.fields() if "help" in f.metadata}
    flags = {a.dest: a for a in sub._actions if a.dest in fields}
    assert set(flags) == set(fields) and len(fields) >= 21  # 22 before --ramp became --bridge ramp
    for name, action in flags.items():
        f = fields[name]
        if f.type != "bool" and f.default is not None and "default" not in f.metadata["help"]:
            assert f"(default {f.default})" in action.help % {}
    args = build_parser().parse_args(["remove-ln", "m", "--out", "o"])
    assert not any(hasattr(args, n) for n in fields)
    args = build_parser().parse_args(["remove-ln", "m", "--steps-per-ln", "3", "--no-control", "--lr", "1e-3",
                                      "--split-mlp", "--sigma", "median"])
    assert {n: getattr(args, n) for n in fields if hasattr(args, n)} == {
        "steps_per_ln": 3, "control": False, "lr": 1e-3, "split_mlp": True, "sigma": "median"}


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("recipes") / "sw"
    workbench.train("pre-rms", d, steps=4, corpus=str(tiny_corpus),
                    model_overrides={**TINY_MODEL, "mlp": "swiglu", "act_fn": "silu", "pos": "rope"},
                    train_overrides=TINY_TRAIN, progress=False)
    return d


def test_explain_prints_the_method_and_writes_nothing(gated_run, tmp_path, capsys):
    assert main(["remove-ln", str(gated_run), "--explain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recipe gated (chosen by capability: the model has a gated (SwiGLU) MLP;")
    rows = {line.split()[0]: line for line in out[1:] if line.startswith("    ")}
    assert set(rows) == {f.name for _, f in RemovalConfig.fields()}
    parts = [line.strip() for line in out[1:] if line.startswith("  ") and not line.startswith(("    ", "  ("))]
    assert parts == ["schedule", "calibration", "handover", "losses", "optimization", "runtime"]
    assert rows["split_mlp"].endswith("(recipe gated)") and rows["sigma"].endswith("(default)")
    assert main(["remove-ln", str(gated_run), "--explain", "--recipe", "gpt2", "--steps-per-ln", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("recipe gpt2 (asked for;") and "steps_per_ln       3" in out and "(given)" in out
    assert not list(tmp_path.iterdir())


def test_remove_ln_without_a_config_takes_the_recipe(gated_run, tmp_path, tiny_corpus):
    s = remove_ln(gated_run, tmp_path / "free", corpus=str(tiny_corpus), progress=False,
                            options=dict(tokens_per_step=64, eval_batches=1, eval_batch_size=4, warmup_steps=1,
                                         steps_per_ln=1, special_steps=2, control=False, dtype="float32"))
    assert s["recipe"] == "gated" and s["config"]["split_mlp"] and s["config"]["mlp_penalty"] == 1.0
    assert s["config"]["steps_per_ln"] == 1 and s["fold_max_abs_logit_diff"] <= 1e-4
    assert json.loads((tmp_path / "free" / "summary.json").read_text())["recipe"] == "gated"
    with pytest.raises(WorkbenchError, match="either a RemovalConfig or a recipe"):
        remove_ln(gated_run, tmp_path / "other", RemovalConfig.of(), recipe="gpt2")


def _method(rc: RemovalConfig) -> dict:
    """Every field of the method but the runtime's (dtype, checkpoints), which do not change what is computed."""
    return {f.name: getattr(getattr(rc, owner), f.name) for owner, f in rc.fields() if owner != "runtime"}


def test_the_sink_recipe_is_the_documented_command_of_its_measured_run():
    """`--recipe sink` must be the flags that made the run docs/ln_removal.md reports for it, parsed by the CLI
    from the docs' command, with the Llama family's defaults under both; and it is never chosen unasked."""
    import re
    import shlex
    from pathlib import Path

    from workbench.loader.llama import REMOVAL_DEFAULTS

    doc = (Path(__file__).parents[1] / "docs" / "ln_removal.md").read_text()
    command = re.search(r"<!-- sink-recipe -->\n```\n(.*?)```\n<!-- /sink-recipe -->", doc, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["workbench", "remove-ln"] and "--recipe" not in argv
    args = build_parser().parse_args(argv[1:])
    given = {f.name: getattr(args, f.name) for _, f in RemovalConfig.fields() if hasattr(args, f.name)}
    assert len(given) >= 15
    by_flags, _, _ = resolve(GATED, given, family=REMOVAL_DEFAULTS)
    by_recipe, source, r = resolve(GATED, {}, recipe="sink", family=REMOVAL_DEFAULTS)
    assert _method(by_recipe) == _method(by_flags)
    assert source["lr"] == "recipe sink" and by_recipe.optimization.lr == 3e-5  # above the family's 2e-5
    assert r.auto is False and resolve(GATED, {})[2].name == "gated"


def test_a_flag_is_checked_against_the_recipe_it_overrides(gated_run, capsys):
    """`--bridge-steps` alone needs a hand-over; under `--recipe sink`, which sets one, it is a valid override —
    checked before the model loads, so an unknown recipe is refused there too."""
    assert main(["remove-ln", str(gated_run), "--explain", "--recipe", "sink", "--bridge-steps", "8"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("    ")}
    assert rows["bridge_steps"].split()[1:] == ["8", "(given)"] and rows["bridge"].endswith("(recipe sink)")
    assert main(["remove-ln", str(gated_run), "--explain", "--bridge-steps", "8"]) == 2
    assert "--bridge-steps needs a hand-over" in capsys.readouterr().err
    assert main(["remove-ln", "no/such/model", "--out", "x", "--recipe", "fast"]) == 2
    assert "unknown --recipe 'fast'" in capsys.readouterr().err
