"""The bundled prompts with known answers, and how a model does on them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import WorkbenchError
from ..model import GPT
from ..texts import bundled_path


@dataclass(frozen=True)
class Prompt:
    name: str
    kind: str
    prompt: str
    answer: str
    contrast: str
    corrupt: str | None = None  # same length; its natural answer is ``contrast``


def load_prompts() -> list[Prompt]:
    return [Prompt(**p) for p in json.loads(bundled_path("prompts.json").read_text())["prompts"]]


def usable(model: GPT, p: Prompt, need_pair: bool = False) -> bool:
    """All answer words single tokens, the prompt within context, the pair of equal length."""
    if need_pair and p.corrupt is None:
        return False
    try:
        for word in (p.answer, p.contrast):
            model.to_single_token(word)
    except WorkbenchError:
        return False
    n = model.to_tokens(p.prompt).shape[-1]
    if n > model.cfg.n_ctx:
        return False
    if need_pair:
        return model.to_tokens(p.corrupt).shape[-1] == n
    return True


@torch.no_grad()
def prompt_accuracy(model: GPT, prompts: list[Prompt] | None = None) -> pd.DataFrame:
    """Answer − contrast logit difference and the answer's rank for every usable prompt."""
    rows = []
    for p in prompts or load_prompts():
        if not usable(model, p):
            continue
        logits = model(model.to_tokens(p.prompt))[0, -1]
        a, c = model.to_single_token(p.answer), model.to_single_token(p.contrast)
        rows.append({"name": p.name, "kind": p.kind, "logit_diff": (logits[a] - logits[c]).item(),
                     "answer_rank": int((logits > logits[a]).sum())})
    return pd.DataFrame(rows)
