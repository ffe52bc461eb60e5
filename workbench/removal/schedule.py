"""The removal order of Baroni et al. (2025): the MLP norms first, then attention's Q/K path, then its
V path, then the final norm; the special positions (BOS, end-of-text) lose their own scale last.

With a split gated MLP (``--split-mlp``) the up path's norms take the MLP norms' place at the front and
the gate's norms go last, after the final norm: while the gate still divides by its live scale,
silu(W_g x/s)·(W_u x/σ) grows like ‖x‖ — as a GELU MLP does — instead of ‖x‖².

Norms on sub-layer outputs (sandwich blocks: ``ln2_post``, then ``ln1_post``) go first: while every
sub-layer still reads a normalized input, freezing the scale of what it adds changes only how much it adds.
QK-norms (``attn.q_norm``, then ``attn.k_norm``; one σ per head) go just before the Q/K path's input norm,
for the same reason: while ln1 is live, each head's query and key scale is nearly constant already."""

from __future__ import annotations

from dataclasses import dataclass

from ..norms import Norm

SPECIAL_OFF = "special positions"
# the plan's steps before the first freeze and after the last, as metrics.jsonl's `norm` names them
PRECONDITION, COOL_DOWN = "precondition", "final"


@dataclass
class NormSite:
    name: str  # module path, e.g. "blocks.3.ln1_v"
    norm: Norm
    kind: str = "other"  # "mlp" for a norm an MLP reads (the --mlp-penalty sites), "qk" for a QK-norm


def standard_schedule(ln2: list[NormSite], ln1_qk: list[NormSite], ln1_v: list[NormSite],
                      final: NormSite, ln2_up: list[NormSite] | None = None,
                      post: list[NormSite] | None = None, qk: list[NormSite] | None = None) -> list[NormSite]:
    post, qk = post or [], qk or []
    if ln2_up:
        return [*post, *ln2_up, *qk, *ln1_qk, *ln1_v, final, *ln2]
    return [*post, *ln2, *qk, *ln1_qk, *ln1_v, final]


def schedule_names(sites: list[NormSite]) -> list[str]:
    return [s.name for s in sites] + [SPECIAL_OFF]
