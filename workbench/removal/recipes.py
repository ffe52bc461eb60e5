"""Named removal recipes, chosen by what the model can do, and the one place a method is resolved.

A recipe is data: the fields of :class:`RemovalConfig` it sets, the capability it is for, and the
measurement that made it the default. :func:`resolve` layers, lowest first: the fields' own defaults,
the family's defaults, the recipe, and the fields the user gave; it returns the config and where each
value came from (``remove-ln --explain`` prints that). A recipe sits above the family because it was
measured on a model of that family with every value it sets (``sink``'s learning rate included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..errors import WorkbenchError
from .method import RemovalConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    gated: bool  # the capability it is chosen for: a gated MLP (ModelConfig.gated_mlp) or not
    chosen_for: str  # that capability, in words
    fields: dict[str, Any] = field(default_factory=dict)
    evidence: str = ""
    # chosen by capability when no recipe is named; False: only when asked for (what it needs — a massive
    # activation at a document-start sink — is a measurement, not something a config says)
    auto: bool = True

    def applies(self, cfg: ModelConfig) -> bool:
        return cfg.gated_mlp == self.gated


RECIPES = {
    "gpt2": Recipe("gpt2", False, "an ungated (GELU) MLP", {},
                   "the GPT-2 schedule of Heimersheim 2024 (sandwich post-norms first where present; ln2 → QK-norms → ln1 Q/K → ln1 V → ln_final → special positions, "
                   "K = 2); every GELU zoo result in docs/ln_removal.md"),
    "gated": Recipe("gated", True, "a gated (SwiGLU) MLP",
                    {"split_mlp": True, "mlp_penalty": 1.0, "special_steps": 16, "steps_per_ln": 4},
                    "docs/ln_removal.md, SwiGLU test bed: defaults fail (NaN); split MLP norm + MLP penalty + "
                    "16-step special hand-over at K = 4: +0.019 nats vs control"),
    "sink": Recipe("sink", True, "a pretrained gated MLP with a massive activation at a document-start sink",
                   {"split_mlp": True, "steps_per_ln": 2, "final_steps": 1024, "tokens_per_step": 512,
                    "precondition": 60, "scale_loss": 10.0, "sigma": "q99.9", "bridge": "ramp", "bridge_steps": 32,
                    "special_positions": 2, "special_steps": 32, "sink_prefix": True, "mlp_penalty": 1.0,
                    "frozen_penalty": 1.0, "penalty_pool": "max", "guard": 4.0, "lr": 3e-5},
                   "docs/ln_removal.md, SmolLM2-135M run S12: all 121 norms, +0.145 nats vs its control on 127 of "
                   "128 windows, 1 overflowing; the best of the measured recipes, not yet the 0.10 target",
                   auto=False),
}


def choose(cfg: ModelConfig) -> Recipe:
    return next(r for r in RECIPES.values() if r.auto and r.applies(cfg))


def _asked(name: str | None) -> Recipe | None:
    """The recipe named, or None for auto (which depends on the model); an unknown name is refused."""
    if name in (None, "auto"):
        return None
    if name not in RECIPES:
        raise WorkbenchError(f"unknown --recipe {name!r}; choose one of: auto, {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_named(name: str | None, cfg: ModelConfig) -> Recipe:
    asked = _asked(name)
    return choose(cfg) if asked is None else asked


def fields_asked(name: str | None) -> dict[str, Any]:
    """The fields of the recipe asked for by name ({} for auto, whose recipe depends on the model): what a
    flag is checked against before the model is loaded (``--recipe sink --bridge-steps 8`` is valid because
    the recipe sets a hand-over)."""
    asked = _asked(name)
    return {} if asked is None else dict(asked.fields)


def resolve(cfg: ModelConfig, given: dict[str, Any], recipe: str | None = None,
            family: dict[str, Any] | None = None) -> tuple[RemovalConfig, dict[str, str], Recipe]:
    """The config for ``cfg`` and, per field, where its value came from: default, family, recipe NAME, given."""
    r = recipe_named(recipe, cfg)
    names = {f.name for _, f in RemovalConfig.fields()}
    unknown = sorted(set(given) - names)
    if unknown:
        raise WorkbenchError(f"remove-ln has no option {unknown[0]!r}; see remove-ln --help")
    values: dict[str, Any] = {}
    source = {n: "default" for n in names}
    family_fields = {k: v for k, v in (family or {}).items() if k in names}
    for layer, how in ((family_fields, "family"), (r.fields, f"recipe {r.name}"), (given, "given")):
        for k, v in layer.items():
            values[k], source[k] = v, how
    return RemovalConfig.of(**values), source, r


def explain(rc: RemovalConfig, source: dict[str, str], r: Recipe, asked: bool) -> str:
    """Every field of the resolved method, with where its value came from, as lines of text."""
    how = "asked for" if asked else f"chosen by capability: the model has {r.chosen_for}"
    lines = [f"recipe {r.name} ({how}; {r.evidence})"]
    part = None
    for owner, f in rc.fields():
        if owner != part:
            lines.append(f"  {owner}")
            part = owner
        lines.append(f"    {f.name:<18} {getattr(getattr(rc, owner), f.name)!r:<10} ({source[f.name]})")
    return "\n".join(lines)


__all__ = ["RECIPES", "Recipe", "choose", "explain", "fields_asked", "recipe_named", "resolve"]
