"""Token positions and hook positions.

Behind an attention-sink prefix (``model/sink.py``) a model computes positions 1, 2, … only: its hooks'
position axis is one shorter than the tokens and starts at token position 1, while position 0 is the stored
prefix (its keys, values and logits; no residual stream, no norm scales). Analyses take and report *token*
positions; these translate them to hook positions and refuse, in one line, what position 0 cannot answer.
"""

from __future__ import annotations

from ..errors import WorkbenchError
from ..model import GPT

SINK_POSITION_0 = ("position 0 of this model is a fixed attention-sink prefix (stored keys, values and logits; "
                   "it is not computed)")


def first_computed(model: GPT) -> int:
    """The token position of the hooks' first entry: 1 behind a sink prefix, else 0."""
    return 0 if getattr(model, "sink_token", None) is None else 1


def hook_position(model: GPT, n_tokens: int, pos: int, what: str) -> int:
    """The hook index of token position ``pos`` (negative: from the end) of an ``n_tokens``-token input."""
    p = pos + n_tokens if pos < 0 else pos
    if not 0 <= p < n_tokens:
        raise WorkbenchError(f"position {pos} is outside the prompt's {n_tokens} tokens")
    first = first_computed(model)
    if p < first:
        raise WorkbenchError(f"{what} at position {pos} is undefined: {SINK_POSITION_0}; pick a position ≥ 1")
    return p - first


def require_computed(model: GPT, n_tokens: int, needed: int, what: str) -> None:
    """Refuse an input with fewer than ``needed`` positions that the model computes."""
    first = first_computed(model)
    if n_tokens - first < needed:
        behind = f" ({SINK_POSITION_0})" if first else ""
        raise WorkbenchError(f"the prompt has {n_tokens} token(s); {what} needs at least {needed + first}{behind}")
