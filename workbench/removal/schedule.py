"""The removal order of Baroni et al. (2025): the MLP norms first, then attention's Q/K path, then its
V path, then the final norm; the special positions (BOS, end-of-text) lose their own scale last.

With a split gated MLP (``--split-mlp``) the up path's norms take the MLP norms' place at the front and
the gate's norms go last, after the final norm: while the gate still divides by its live scale,
silu(W_g x/s)·(W_u x/σ) grows like ‖x‖ — as a GELU MLP does — instead of ‖x‖²."""

from __future__ import annotations

from dataclasses import dataclass

from ..norms import Norm

SPECIAL_OFF = "special positions"


@dataclass
class NormSite:
    name: str  # module path, e.g. "blocks.3.ln1_v"
    norm: Norm
    kind: str = "other"  # "mlp" for a norm an MLP reads (the --mlp-penalty sites)


def standard_schedule(ln2: list[NormSite], ln1_qk: list[NormSite], ln1_v: list[NormSite],
                      final: NormSite, ln2_up: list[NormSite] | None = None) -> list[NormSite]:
    if ln2_up:
        return [*ln2_up, *ln1_qk, *ln1_v, final, *ln2]
    return [*ln2, *ln1_qk, *ln1_v, final]


def schedule_names(sites: list[NormSite]) -> list[str]:
    return [s.name for s in sites] + [SPECIAL_OFF]
